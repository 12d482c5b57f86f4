//! Validators: the checks that turn a pattern match into a finding.
//!
//! A regular expression only says that something has the shape of a card number or a
//! token; these functions say whether it *is* one (a Luhn checksum, an IBAN's mod-97,
//! the SSA's numbering rules, a JWT header that decodes to JSON with an `alg`, a GitHub
//! token's CRC32). They are pure, allocation-light and never panic on any input.

use base64::Engine as _;

/// Luhn (mod 10) checksum over ASCII digits; separators must already be removed.
pub fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d.wrapping_sub(b'0'));
        if v > 9 {
            return false;
        }
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    !digits.is_empty() && sum.is_multiple_of(10)
}

/// Whether a digit string has the prefix and length of a payment card network:
/// Visa, Mastercard (51-55, 2221-2720), American Express, Discover, Diners Club, JCB,
/// UnionPay, Maestro and Mir.
pub fn card_network(digits: &[u8]) -> bool {
    let len = digits.len();
    let prefix = |n: usize| -> u32 {
        digits.iter().take(n).fold(0u32, |acc, d| acc * 10 + u32::from(d.wrapping_sub(b'0') % 10))
    };
    if !(13..=19).contains(&len) {
        return false;
    }
    let p1 = prefix(1);
    let p2 = prefix(2);
    let p3 = prefix(3);
    let p4 = prefix(4);
    let p6 = prefix(6);
    match p1 {
        // JCB's original 15-digit ranges.
        1 | 2 if (p4 == 1800 || p4 == 2131) && len == 15 => true,
        // Visa: 13, 16 or 19 digits.
        4 => matches!(len, 13 | 16 | 19),
        // Mastercard 51-55, Maestro 50/56-59.
        5 => match p2 {
            51..=55 => len == 16,
            50 | 56..=59 => (13..=19).contains(&len),
            _ => false,
        },
        // Mastercard 2221-2720, Mir 2200-2204.
        2 => ((2221..=2720).contains(&p4) && len == 16) || ((2200..=2204).contains(&p4) && (16..=19).contains(&len)),
        3 => match p2 {
            // American Express.
            34 | 37 => len == 15,
            // Diners Club.
            36 | 38 | 39 => (14..=19).contains(&len),
            30 => (300..=305).contains(&p3) && (14..=19).contains(&len) || p3 == 309 && (14..=19).contains(&len),
            // JCB: 3528-3589 are assigned; the whole 35 range is JCB's.
            35 => (16..=19).contains(&len),
            _ => false,
        },
        6 => {
            // Discover 6011, 644-649, 65, 622126-622925; UnionPay 62; Maestro 6x.
            (p4 == 6011 || (644..=649).contains(&p3) || p2 == 65 || (622_126..=622_925).contains(&p6))
                && (16..=19).contains(&len)
                || p2 == 62 && (16..=19).contains(&len)
                || matches!(p2, 60 | 61 | 63 | 66 | 67 | 68 | 69) && (13..=19).contains(&len)
        }
        _ => false,
    }
}

/// IBAN lengths by country (ISO 13616 registry).
const IBAN_LENGTHS: &[(&[u8; 2], u8)] = &[
    (b"AD", 24),
    (b"AE", 23),
    (b"AL", 28),
    (b"AT", 20),
    (b"AZ", 28),
    (b"BA", 20),
    (b"BE", 16),
    (b"BG", 22),
    (b"BH", 22),
    (b"BI", 27),
    (b"BR", 29),
    (b"BY", 28),
    (b"CH", 21),
    (b"CR", 22),
    (b"CY", 28),
    (b"CZ", 24),
    (b"DE", 22),
    (b"DJ", 27),
    (b"DK", 18),
    (b"DO", 28),
    (b"EE", 20),
    (b"EG", 29),
    (b"ES", 24),
    (b"FI", 18),
    (b"FK", 18),
    (b"FO", 18),
    (b"FR", 27),
    (b"GB", 22),
    (b"GE", 22),
    (b"GI", 23),
    (b"GL", 18),
    (b"GR", 27),
    (b"GT", 28),
    (b"HR", 21),
    (b"HU", 28),
    (b"IE", 22),
    (b"IL", 23),
    (b"IQ", 23),
    (b"IS", 26),
    (b"IT", 27),
    (b"JO", 30),
    (b"KW", 30),
    (b"KZ", 20),
    (b"LB", 28),
    (b"LC", 32),
    (b"LI", 21),
    (b"LT", 20),
    (b"LU", 20),
    (b"LV", 21),
    (b"LY", 25),
    (b"MC", 27),
    (b"MD", 24),
    (b"ME", 22),
    (b"MK", 19),
    (b"MN", 20),
    (b"MR", 27),
    (b"MT", 31),
    (b"MU", 30),
    (b"NI", 28),
    (b"NL", 18),
    (b"NO", 15),
    (b"OM", 23),
    (b"PK", 24),
    (b"PL", 28),
    (b"PS", 29),
    (b"PT", 25),
    (b"QA", 29),
    (b"RO", 24),
    (b"RS", 22),
    (b"RU", 33),
    (b"SA", 24),
    (b"SC", 31),
    (b"SD", 18),
    (b"SE", 24),
    (b"SI", 19),
    (b"SK", 24),
    (b"SM", 27),
    (b"SO", 23),
    (b"ST", 25),
    (b"SV", 28),
    (b"TL", 23),
    (b"TN", 24),
    (b"TR", 26),
    (b"UA", 29),
    (b"VA", 22),
    (b"VG", 24),
    (b"XK", 20),
];

/// An IBAN without spaces: known country, that country's length, mod-97 remainder 1.
pub fn iban(compact: &[u8]) -> bool {
    let Some(country) = compact.get(..2) else {
        return false;
    };
    let Some(&(_, len)) = IBAN_LENGTHS.iter().find(|(c, _)| c.as_slice() == country) else {
        return false;
    };
    if compact.len() != usize::from(len) {
        return false;
    }
    // Move the first four characters to the end, letters become 10..35, mod 97.
    let mut rem = 0u32;
    for &b in compact.iter().skip(4).chain(compact.iter().take(4)) {
        match b {
            b'0'..=b'9' => rem = (rem * 10 + u32::from(b - b'0')) % 97,
            b'A'..=b'Z' => rem = (rem * 100 + u32::from(b - b'A' + 10)) % 97,
            _ => return false,
        }
    }
    rem == 1
}

/// US Social Security Number rules: no area 000, 666 or 900-999, no group 00, no
/// serial 0000.
pub fn ssn(area: u32, group: u32, serial: u32) -> bool {
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

/// A JWT header segment: base64url that decodes to a JSON object with an `alg` member.
pub fn jwt_header(segment: &str) -> bool {
    if segment.len() > 4096 {
        return false;
    }
    let trimmed = segment.trim_end_matches('=');
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed) else {
        return false;
    };
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(map)) => map.contains_key("alg"),
        _ => false,
    }
}

/// An HTTP Basic credential: standard base64 of printable `user:password`.
pub fn basic_credentials(token: &str) -> bool {
    if token.len() > 4096 {
        return false;
    }
    let engine = base64::engine::general_purpose::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let Ok(bytes) = engine.decode(token) else {
        return false;
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return false;
    };
    text.contains(':') && !text.starts_with(':') && text.chars().all(|c| !c.is_control())
}

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The CRC32 (IEEE) of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// A GitHub (`ghp_`, `gho_`, ...) or npm (`npm_`) token's checksum: the last six
/// base62 characters encode the CRC32 of the thirty random ones before them.
pub fn github_checksum(token: &str) -> bool {
    let Some((_, body)) = token.split_once('_') else {
        return false;
    };
    if body.len() != 36 {
        return false;
    }
    let (random, check) = body.as_bytes().split_at(30);
    let mut value = 0u64;
    for &c in check {
        let Some(d) = BASE62.iter().position(|&x| x == c) else {
            return false;
        };
        value = value * 62 + d as u64;
    }
    value == u64::from(crc32(random))
}

/// Encodes a CRC32 as six base62 characters, the inverse of [`github_checksum`]'s check.
pub fn base62_checksum(crc: u32) -> [u8; 6] {
    let mut out = [b'0'; 6];
    let mut v = u64::from(crc);
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(v % 62) as usize];
        v /= 62;
    }
    out
}

/// Shannon entropy in bits per character.
pub fn entropy(s: &str) -> f64 {
    let mut counts = [0u32; 256];
    let mut n = 0u32;
    for b in s.bytes() {
        counts[usize::from(b)] += 1;
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    let n = f64::from(n);
    counts.iter().filter(|&&c| c > 0).map(|&c| f64::from(c) / n).map(|p| -p * p.log2()).sum()
}

/// Whether a value assigned to a weakly secret-ish name (`cache_key`, `signing`)
/// looks like generated key material rather than a word: long, varied characters,
/// and both letters and digits.
pub fn looks_generated(value: &str) -> bool {
    let len = value.len();
    if !(16..=512).contains(&len) {
        return false;
    }
    let has_digit = value.bytes().any(|b| b.is_ascii_digit());
    let has_alpha = value.bytes().any(|b| b.is_ascii_alphabetic());
    let no_space = !value.bytes().any(|b| b.is_ascii_whitespace());
    has_digit && has_alpha && no_space && entropy(value) >= 3.3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_accepts_test_cards_and_refuses_one_digit_off() {
        assert!(luhn(b"4111111111111111"));
        assert!(luhn(b"378282246310005"));
        assert!(!luhn(b"4111111111111112"));
        assert!(!luhn(b""));
        assert!(!luhn(b"41x1"));
    }

    #[test]
    fn card_networks_need_prefix_and_length() {
        assert!(card_network(b"4111111111111111"));
        assert!(card_network(b"378282246310005"));
        assert!(card_network(b"5555555555554444"));
        assert!(card_network(b"2223003122003222"));
        assert!(card_network(b"6011111111111117"));
        assert!(card_network(b"3530111333300000"));
        assert!(card_network(b"30569309025904"));
        assert!(!card_network(b"1700000000000"));
        assert!(!card_network(b"9111111111111111"));
        assert!(!card_network(b"37828224631000"));
    }

    #[test]
    fn iban_checks_country_length_and_mod_97() {
        assert!(iban(b"GB82WEST12345698765432"));
        assert!(iban(b"DE89370400440532013000"));
        assert!(!iban(b"GB82WEST12345698765433"));
        assert!(!iban(b"GB82WEST1234569876543"));
        assert!(!iban(b"ZZ82WEST12345698765432"));
        assert!(!iban(b"G"));
    }

    #[test]
    fn ssn_follows_the_ssa_rules() {
        assert!(ssn(123, 45, 6789));
        assert!(!ssn(0, 45, 6789));
        assert!(!ssn(666, 45, 6789));
        assert!(!ssn(901, 45, 6789));
        assert!(!ssn(123, 0, 6789));
        assert!(!ssn(123, 45, 0));
    }

    #[test]
    fn jwt_headers_must_be_json_with_alg() {
        assert!(jwt_header("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"));
        // {"typ":"JWT"}
        assert!(!jwt_header("eyJ0eXAiOiJKV1QifQ"));
        assert!(!jwt_header("eyJ!!!"));
    }

    #[test]
    fn github_checksums_round_trip() {
        let random = b"abcdefghijABCDEFGHIJ0123456789";
        let check = base62_checksum(crc32(random));
        let token = format!("ghp_{}{}", std::str::from_utf8(random).unwrap(), std::str::from_utf8(&check).unwrap());
        assert!(github_checksum(&token));
        let mut bad = token.clone();
        bad.replace_range(4..5, "b");
        assert!(!github_checksum(&bad));
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn basic_credentials_decode_to_user_colon_password() {
        assert!(basic_credentials("dXNlcjpwYXNz"));
        assert!(!basic_credentials("authentication"));
        assert!(!basic_credentials("dXNlcg=="));
    }

    #[test]
    fn generated_values_are_told_from_words() {
        assert!(looks_generated("8f3a9c1d2e4b5a6f7c8d9e0f1a2b3c4d"));
        assert!(!looks_generated("user:1234"));
        assert!(!looks_generated("aaaaaaaaaaaaaaaa1"));
    }
}
