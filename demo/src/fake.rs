//! Deterministic, realistic fake personal data.
//!
//! The shop exists to show what Periscope captures from a real service, and real
//! services hold names, e-mail addresses, phone numbers in every national format, card
//! numbers that pass the Luhn check, IBANs that pass mod-97, social security numbers and
//! IP addresses. Redaction is only convincingly demonstrated on data that validators
//! accept, so every generator here produces syntactically valid values: cards from test
//! prefixes with correct check digits, IBANs with correct check digits, SSNs outside the
//! never-issued ranges. Nothing is real: addresses are plausible but invented, IPs come
//! from the documentation ranges (RFC 5737, RFC 3849), and the well-known card numbers are
//! the processors' public test cards.
//!
//! Everything is drawn from a small seeded generator ([`Rng`]), so a seed reproduces a
//! run, and from built-in tables rather than a faker crate.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::{Address, GeoPoint};

/// A small, fast, seeded pseudo-random generator (SplitMix64).
///
/// Not cryptographic; chosen because it is a dozen lines, has no dependency, and
/// reproduces a run from a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose whole output is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo).saturating_add(1))
    }

    /// A float in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// One element of a table; `None` only for an empty one.
    pub fn pick<'t, T>(&mut self, items: &'t [T]) -> Option<&'t T> {
        items.get(self.below(items.len() as u64) as usize)
    }

    /// One element of a built-in, non-empty string table.
    fn word(&mut self, items: &[&'static str]) -> &'static str {
        self.pick(items).copied().unwrap_or_default()
    }

    /// A string of `n` random decimal digits.
    pub fn digits(&mut self, n: usize) -> String {
        (0..n).map(|_| char::from(b'0' + self.below(10) as u8)).collect()
    }
}

/// Countries the generator knows how to write addresses, phones and IBANs for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Country {
    /// United States.
    Us,
    /// United Kingdom.
    Gb,
    /// France.
    Fr,
    /// Germany.
    De,
    /// Japan.
    Jp,
    /// India.
    In,
}

impl Country {
    /// Every supported country.
    pub const ALL: [Country; 6] = [Country::Us, Country::Gb, Country::Fr, Country::De, Country::Jp, Country::In];

    /// ISO 3166-1 alpha-2 code.
    pub fn code(self) -> &'static str {
        match self {
            Country::Us => "US",
            Country::Gb => "GB",
            Country::Fr => "FR",
            Country::De => "DE",
            Country::Jp => "JP",
            Country::In => "IN",
        }
    }

    /// The country for an alpha-2 code, if supported.
    pub fn from_code(code: &str) -> Option<Country> {
        Country::ALL.into_iter().find(|c| c.code().eq_ignore_ascii_case(code))
    }

    /// Sales tax or VAT on goods, in basis points.
    pub fn tax_bps(self) -> u32 {
        match self {
            Country::Us => 825,
            Country::Gb | Country::Fr => 2_000,
            Country::De => 1_900,
            Country::Jp => 1_000,
            Country::In => 1_800,
        }
    }

    fn given_names(self) -> &'static [&'static str] {
        match self {
            Country::Us => &["James", "Mary", "Olivia", "Liam", "Noah", "Emma", "Ava", "Ethan", "Sofía", "DeShawn"],
            Country::Gb => &["Oliver", "Amelia", "George", "Isla", "Harry", "Freya", "Siobhan", "Rhys"],
            Country::Fr => &["Amélie", "Lucas", "Chloé", "Hugo", "Léa", "Maël", "Inès", "Noé"],
            Country::De => &["Lukas", "Jürgen", "Sophie", "Maximilian", "Anna", "Jörg", "Mia", "Björn"],
            Country::Jp => &["Haruto", "Yui", "Sota", "Himari", "Ren", "Aoi", "Yuto", "Mei"],
            Country::In => &["Aarav", "Diya", "Vivaan", "Ananya", "Arjun", "Saanvi", "Ishaan", "Priya"],
        }
    }

    fn family_names(self) -> &'static [&'static str] {
        match self {
            Country::Us => &["Smith", "Johnson", "Garcia", "Williams", "Brown", "Nguyen", "Martinez", "O'Connor"],
            Country::Gb => &["Jones", "Taylor", "Davies", "Evans", "Wilson", "Thomas", "Roberts", "Ó Briain"],
            Country::Fr => &["Martin", "Bernard", "Dubois", "Lefèvre", "Moreau", "Laurent", "Girard", "Roux"],
            Country::De => &["Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Groß"],
            Country::Jp => &["Sato", "Suzuki", "Takahashi", "Tanaka", "Watanabe", "Ito", "Yamamoto", "Nakamura"],
            Country::In => &["Sharma", "Patel", "Singh", "Kumar", "Reddy", "Iyer", "Gupta", "Nair"],
        }
    }

    fn streets(self) -> &'static [&'static str] {
        match self {
            Country::Us => &["Main St", "Oak Avenue", "Maple Dr", "Sunset Blvd", "Elm Street", "Market St"],
            Country::Gb => &["High Street", "Station Road", "Church Lane", "Victoria Road", "Baker Street"],
            Country::Fr => &["rue de la Paix", "avenue Victor Hugo", "boulevard Saint-Germain", "rue Lafayette"],
            Country::De => &["Hauptstraße", "Schulstraße", "Gartenweg", "Bahnhofstraße", "Lindenallee"],
            Country::Jp => &["Chuo-dori", "Meiji-dori", "Omotesando", "Yasukuni-dori"],
            Country::In => &["MG Road", "Brigade Road", "Linking Road", "Park Street", "Anna Salai"],
        }
    }

    /// Cities with their region, a postcode prefix and coordinates.
    fn cities(self) -> &'static [(&'static str, &'static str, &'static str, f64, f64)] {
        match self {
            Country::Us => &[
                ("San Francisco", "CA", "941", 37.7749, -122.4194),
                ("Austin", "TX", "787", 30.2672, -97.7431),
                ("Brooklyn", "NY", "112", 40.6782, -73.9442),
                ("Seattle", "WA", "981", 47.6062, -122.3321),
            ],
            Country::Gb => &[
                ("London", "Greater London", "SW1A ", 51.5072, -0.1276),
                ("Manchester", "Greater Manchester", "M1 ", 53.4808, -2.2426),
                ("Edinburgh", "Scotland", "EH1 ", 55.9533, -3.1883),
            ],
            Country::Fr => &[
                ("Paris", "Île-de-France", "750", 48.8566, 2.3522),
                ("Lyon", "Auvergne-Rhône-Alpes", "690", 45.7640, 4.8357),
                ("Marseille", "Provence-Alpes-Côte d'Azur", "130", 43.2965, 5.3698),
            ],
            Country::De => &[
                ("Berlin", "Berlin", "101", 52.5200, 13.4050),
                ("München", "Bayern", "803", 48.1351, 11.5820),
                ("Köln", "Nordrhein-Westfalen", "506", 50.9375, 6.9603),
            ],
            Country::Jp => &[
                ("Tokyo", "Tokyo", "100-", 35.6762, 139.6503),
                ("Osaka", "Osaka", "530-", 34.6937, 135.5023),
                ("Sapporo", "Hokkaido", "060-", 43.0618, 141.3545),
            ],
            Country::In => &[
                ("Bengaluru", "Karnataka", "5600", 12.9716, 77.5946),
                ("Mumbai", "Maharashtra", "4000", 19.0760, 72.8777),
                ("Chennai", "Tamil Nadu", "6000", 13.0827, 80.2707),
            ],
        }
    }
}

/// Someone signing up: everything a shop asks for, and a little it should not keep.
#[derive(Debug, Clone)]
pub struct Person {
    /// Full name as the person writes it.
    pub name: String,
    /// A plausible personal address at a reserved example domain.
    pub email: String,
    /// Phone number in the country's usual written format.
    pub phone: String,
    /// `YYYY-MM-DD`.
    pub date_of_birth: String,
    /// Home address.
    pub address: Address,
    /// Where the sign-up came from (documentation ranges only).
    pub ip: IpAddr,
    /// A US social security number, for US residents only.
    pub ssn: Option<String>,
    /// The password they typed; the shop stores only a hash.
    pub password: String,
    /// Their country.
    pub country: Country,
}

/// A payment card, in the shape a checkout form collects it.
#[derive(Debug, Clone)]
pub struct FakeCard {
    /// Name on the card.
    pub holder: String,
    /// Digits only, Luhn-valid.
    pub number: String,
    /// Expiry month, 1-12.
    pub expiry_month: u8,
    /// Expiry year, four digits.
    pub expiry_year: u16,
    /// Three digits, four for Amex.
    pub cvv: String,
}

const EMAIL_DOMAINS: &[&str] = &["example.com", "example.org", "example.net", "mail.example", "inbox.test"];

/// Processors' public test cards, which the shop's simulated processor also knows.
pub const TEST_CARDS: &[&str] = &[
    "4111111111111111",
    "4242424242424242",
    "5555555555554444",
    "5105105105105100",
    "378282246310005",
    "371449635398431",
];

/// Test cards the shop's processor always declines (Stripe's conventions).
pub const DECLINED_CARDS: &[(&str, &str)] =
    &[("4000000000000002", "generic_decline"), ("4000000000009995", "insufficient_funds")];

const USER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0",
    "Mozilla/5.0 (Linux; Android 15; Pixel 9) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Mobile Safari/537.36",
    "ShopApp/4.12.0 (iOS 18.1; iPhone15,3; Scale/3.00)",
];

const UA_EXTRAS: &[&str] = &[
    "FBAN/FBIOS;FBAV/489.0.0.43.107;FBBV/654321987;FBDV/iPhone15,3;FBMD/iPhone;FBSN/iOS;FBSV/18.1;FBSS/3",
    "FBID/phone;FBLC/en_US;FBOP/5;FBRV/0;IABMV/1",
    "Instagram 355.0.0.35.91 (iPhone15,3; iOS 18_1; en_US; en; scale=3.00; 1290x2796; 654321987)",
    "Edg/131.0.2903.51 OPR/114.0.0.0 YaBrowser/24.10.0.0",
    "GSA/343.0.695551749 Mobile/15E148 Safari/604.1 [Pinterest/iOS] Line/14.18.0",
];

const GIFT_OPENERS: &[&str] = &[
    "Happy birthday!",
    "Congratulations on the new job!",
    "Joyeux anniversaire !",
    "Alles Gute zum Geburtstag!",
    "Thinking of you.",
];

const GIFT_SENTENCES: &[&str] = &[
    "I saw this and immediately thought of you, remember the trip to the coast when it rained for three days straight?",
    "Don't open it before Saturday, I mean it this time, your sister already spoiled the surprise last year.",
    "The size should be right, but if not the receipt is in the box and the shop says returns are free for 30 days.",
    "Can't wait to see you at the party, bring the kids and the dog, there will be cake for everyone 🎂🎉.",
    "With all my love, and a promise to finally return the book I borrowed in 2019.",
];

const PRODUCT_ADJECTIVES: &[&str] =
    &["Organic", "Vintage", "Ergonomic", "Handmade", "Recycled", "Wireless", "Compact", "Deluxe", "Waterproof"];
const PRODUCT_MATERIALS: &[&str] = &["Cotton", "Bamboo", "Steel", "Leather", "Ceramic", "Wool", "Oak", "Linen"];
const PRODUCT_NOUNS: &[&str] =
    &["T-Shirt", "Backpack", "Mug", "Lamp", "Notebook", "Headphones", "Scarf", "Chair", "Water Bottle", "Jacket"];
/// Catalog categories, one per product.
pub const CATEGORIES: &[&str] = &["apparel", "home", "electronics", "office", "outdoor", "kitchen"];

/// The table-driven generator of people, cards, IBANs and shop content.
#[derive(Debug, Clone)]
pub struct Faker {
    rng: Rng,
}

impl Faker {
    /// A generator whose whole output is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Faker { rng: Rng::new(seed) }
    }

    /// The underlying random source, for choices that are not data.
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// A country, weighted towards the US.
    pub fn country(&mut self) -> Country {
        if self.rng.chance(0.3) {
            return Country::Us;
        }
        self.rng.pick(&Country::ALL).copied().unwrap_or(Country::Us)
    }

    /// Someone from a random country.
    pub fn person(&mut self) -> Person {
        let country = self.country();
        self.person_in(country)
    }

    /// Someone living in `country`.
    pub fn person_in(&mut self, country: Country) -> Person {
        let given = self.rng.word(country.given_names());
        let family = self.rng.word(country.family_names());
        let name = match country {
            Country::Jp if self.rng.chance(0.5) => format!("{family} {given}"),
            _ => format!("{given} {family}"),
        };
        let email = self.email(given, family);
        let phone = self.phone(country);
        let year = self.rng.range(1950, 2006);
        let month = self.rng.range(1, 12);
        let day = self.rng.range(1, 28);
        let address = self.address(country);
        let ip = self.ip();
        let ssn = (country == Country::Us).then(|| self.ssn());
        let password = format!("{}{}!{}", family.to_lowercase(), self.rng.digits(4), given.len());
        Person {
            name,
            email,
            phone,
            date_of_birth: format!("{year:04}-{month:02}-{day:02}"),
            address,
            ip,
            ssn,
            password,
            country,
        }
    }

    fn email(&mut self, given: &str, family: &str) -> String {
        let local = match self.rng.below(4) {
            0 => format!("{}.{}", ascii_slug(given), ascii_slug(family)),
            1 => format!("{}{}", ascii_slug(given), self.rng.range(1, 99)),
            2 => format!("{}.{}{}", first_letter(given), ascii_slug(family), self.rng.range(70, 99)),
            _ => format!("{}_{}", ascii_slug(family), ascii_slug(given)),
        };
        format!("{local}@{}", self.rng.word(EMAIL_DOMAINS))
    }

    /// A phone number written the way people in `country` write theirs.
    pub fn phone(&mut self, country: Country) -> String {
        let r = &mut self.rng;
        let international = r.chance(0.5);
        match country {
            Country::Us => {
                let area = r.range(201, 989);
                let tail = r.range(100, 199);
                if international { format!("+1 ({area}) 555-0{tail}") } else { format!("({area}) 555-0{tail}") }
            }
            Country::Gb => {
                if international {
                    format!("+44 20 7946 0{}", r.digits(3))
                } else {
                    format!("07700 900{}", r.digits(3))
                }
            }
            Country::Fr => {
                let mobile = if r.chance(0.5) { 6 } else { 7 };
                let g: [String; 4] = std::array::from_fn(|_| r.digits(2));
                if international {
                    format!("+33 {mobile} {} {} {} {}", g[0], g[1], g[2], g[3])
                } else {
                    format!("0{mobile} {} {} {} {}", g[0], g[1], g[2], g[3])
                }
            }
            Country::De => {
                if international {
                    format!("+49 30 {}", r.digits(8))
                } else {
                    format!("0151 {}", r.digits(8))
                }
            }
            Country::Jp => {
                if international {
                    format!("+81 3-{}-{}", r.digits(4), r.digits(4))
                } else {
                    format!("090-{}-{}", r.digits(4), r.digits(4))
                }
            }
            Country::In => {
                let lead = r.range(7, 9);
                if international {
                    format!("+91 {lead}{} {}", r.digits(4), r.digits(5))
                } else {
                    format!("0{lead}{}{}", r.digits(4), r.digits(5))
                }
            }
        }
    }

    /// A postal address in `country`, with coordinates near its city.
    pub fn address(&mut self, country: Country) -> Address {
        let r = &mut self.rng;
        let street = r.word(country.streets());
        let number = r.range(1, 240);
        let (city, region, prefix, lat, lon) =
            r.pick(country.cities()).copied().unwrap_or(("Springfield", "IL", "627", 39.78, -89.65));
        let postcode = match country {
            Country::Gb => format!("{prefix}{}{}{}", r.range(1, 9), char::from(b'A' + r.below(26) as u8), 'A'),
            Country::Jp => format!("{prefix}{}", r.digits(4)),
            Country::In => format!("{prefix}{}", r.digits(2)),
            _ => format!("{prefix}{}", r.digits(2)),
        };
        let line1 = match country {
            Country::Fr | Country::Us | Country::Gb | Country::In => format!("{number} {street}"),
            Country::De => format!("{street} {number}"),
            Country::Jp => format!("{}-{}-{} {street}", r.range(1, 9), r.range(1, 30), r.range(1, 20)),
        };
        let line2 = r.chance(0.3).then(|| match country {
            Country::Fr => format!("Bâtiment {}, {}e étage", char::from(b'A' + r.below(4) as u8), r.range(1, 8)),
            Country::De => format!("{}. OG links", r.range(1, 5)),
            _ => format!("Apt {}", r.range(1, 40)),
        });
        let jitter = |r: &mut Rng| (r.unit() - 0.5) * 0.1;
        Address {
            line1,
            line2,
            city: city.to_owned(),
            region: region.to_owned(),
            postcode,
            country: country.code().to_owned(),
            geo: GeoPoint { lat: lat + jitter(r), lon: lon + jitter(r) },
        }
    }

    /// A client IP from the documentation ranges: 203.0.113.0/24, 198.51.100.0/24 or
    /// 2001:db8::/32.
    pub fn ip(&mut self) -> IpAddr {
        let r = &mut self.rng;
        match r.below(3) {
            0 => IpAddr::V4(Ipv4Addr::new(203, 0, 113, r.range(1, 254) as u8)),
            1 => IpAddr::V4(Ipv4Addr::new(198, 51, 100, r.range(1, 254) as u8)),
            _ => IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0x0db8,
                r.below(0x1_0000) as u16,
                r.below(0x1_0000) as u16,
                0,
                0,
                r.below(0x1_0000) as u16,
                r.range(1, 0xffff) as u16,
            )),
        }
    }

    /// A US social security number outside the never-issued areas (000, 666, 9xx),
    /// group 00 and serial 0000.
    pub fn ssn(&mut self) -> String {
        let r = &mut self.rng;
        let mut area = r.range(1, 899);
        if area == 666 {
            area = 667;
        }
        format!("{area:03}-{:02}-{:04}", r.range(1, 99), r.range(1, 9999))
    }

    /// A Luhn-valid card: a processor test card, or a random Visa, Mastercard or Amex.
    pub fn card(&mut self, holder: &str, expiry_year_now: u16) -> FakeCard {
        let number = match self.rng.below(4) {
            0 => self.rng.word(TEST_CARDS).to_owned(),
            1 => luhn_complete(&format!("4{}", self.rng.digits(14))),
            2 => luhn_complete(&format!("5{}{}", self.rng.range(1, 5), self.rng.digits(13))),
            _ => luhn_complete(&format!("3{}{}", if self.rng.chance(0.5) { 4 } else { 7 }, self.rng.digits(12))),
        };
        let cvv = self.rng.digits(if number.len() == 15 { 4 } else { 3 });
        FakeCard {
            holder: holder.to_owned(),
            number,
            expiry_month: self.rng.range(1, 12) as u8,
            expiry_year: expiry_year_now + self.rng.range(1, 5) as u16,
            cvv,
        }
    }

    /// A valid IBAN for `country` (DE, FR and GB formats; others get a DE-style one).
    pub fn iban(&mut self, country: Country) -> String {
        let r = &mut self.rng;
        let (code, bban) = match country {
            Country::Fr => ("FR", format!("{}{}{}{}", r.digits(5), r.digits(5), r.digits(11), r.digits(2))),
            Country::Gb => {
                let bank = r.word(&["NWBK", "BARC", "LOYD", "MIDL"]);
                ("GB", format!("{bank}{}{}", r.digits(6), r.digits(8)))
            }
            _ => ("DE", format!("{}{}", r.digits(8), r.digits(10))),
        };
        iban_with_check_digits(code, &bban)
    }

    /// A browser user agent; about one in five carries in-app browser tokens that make
    /// it longer than 255 characters, as real ones do.
    pub fn user_agent(&mut self) -> String {
        let mut ua = self.rng.word(USER_AGENTS).to_owned();
        if self.rng.chance(0.2) {
            for extra in UA_EXTRAS {
                ua.push_str(" [");
                ua.push_str(extra);
                ua.push(']');
            }
        }
        ua
    }

    /// A gift message; long ones run past the 255-character string limit.
    pub fn gift_message(&mut self, recipient: &str, long: bool) -> String {
        let mut text = format!("Dear {recipient}, {}", self.rng.word(GIFT_OPENERS));
        let sentences = if long { GIFT_SENTENCES.len() } else { 1 };
        for _ in 0..sentences {
            text.push(' ');
            text.push_str(self.rng.word(GIFT_SENTENCES));
        }
        text
    }

    /// A product name such as "Organic Cotton T-Shirt".
    pub fn product_name(&mut self) -> String {
        format!(
            "{} {} {}",
            self.rng.word(PRODUCT_ADJECTIVES),
            self.rng.word(PRODUCT_MATERIALS),
            self.rng.word(PRODUCT_NOUNS)
        )
    }

    /// A catalog category.
    pub fn category(&mut self) -> &'static str {
        self.rng.word(CATEGORIES)
    }
}

/// The current calendar year (UTC), for card expiry dates.
pub fn current_year() -> u16 {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    // Days since the epoch over the mean Gregorian year: right except for a few hours
    // around New Year, which only decides whether a card expiring this year is expired.
    (1970.0 + ms as f64 / (365.2425 * 86_400_000.0)) as u16
}

fn ascii_slug(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let mapped = match c {
            'á' | 'à' | 'ä' | 'â' => "a",
            'é' | 'è' | 'ë' | 'ê' => "e",
            'í' | 'ï' | 'î' => "i",
            'ó' | 'ö' | 'ô' | 'Ó' => "o",
            'ú' | 'ü' | 'û' => "u",
            'ß' => "ss",
            'ñ' => "n",
            'ç' => "c",
            c if c.is_ascii_alphanumeric() => {
                out.push(c.to_ascii_lowercase());
                continue;
            }
            _ => continue,
        };
        out.push_str(mapped);
    }
    out
}

fn first_letter(s: &str) -> String {
    ascii_slug(s).chars().next().map(String::from).unwrap_or_default()
}

/// Whether a string of digits passes the Luhn check (card numbers).
pub fn luhn_valid(number: &str) -> bool {
    if number.len() < 12 || !number.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    luhn_sum(number.bytes().rev().map(|b| u32::from(b - b'0')), false) % 10 == 0
}

fn luhn_sum(digits: impl Iterator<Item = u32>, double_first: bool) -> u32 {
    digits
        .enumerate()
        .map(|(i, d)| {
            if (i % 2 == 0) == double_first {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum()
}

/// Appends the Luhn check digit to a string of digits.
pub fn luhn_complete(partial: &str) -> String {
    let sum = luhn_sum(partial.bytes().rev().filter(u8::is_ascii_digit).map(|b| u32::from(b - b'0')), true);
    format!("{partial}{}", (10 - sum % 10) % 10)
}

/// ISO 13616 mod-97 of an IBAN rearranged (country and check digits moved to the end),
/// letters counting as 10..35. `None` for characters an IBAN cannot hold.
fn iban_mod97(rearranged: &str) -> Option<u32> {
    let mut rem = 0u32;
    for c in rearranged.chars() {
        let v = c.to_digit(36)?;
        rem = if v >= 10 { (rem * 100 + v) % 97 } else { (rem * 10 + v) % 97 };
    }
    Some(rem)
}

fn iban_with_check_digits(country: &str, bban: &str) -> String {
    let check = iban_mod97(&format!("{bban}{country}00")).map_or(0, |m| 98 - m);
    format!("{country}{check:02}{bban}")
}

/// Whether an IBAN (spaces allowed) has valid check digits.
pub fn iban_valid(iban: &str) -> bool {
    let compact: String = iban.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_ascii_uppercase();
    if !(15..=34).contains(&compact.len()) || !compact.is_ascii() {
        return false;
    }
    let (head, bban) = compact.split_at(4);
    iban_mod97(&format!("{bban}{head}")) == Some(1)
}

/// An IBAN grouped in fours, as people write them.
pub fn iban_grouped(iban: &str) -> String {
    let mut out = String::with_capacity(iban.len() + iban.len() / 4);
    for (i, c) in iban.chars().enumerate() {
        if i > 0 && i % 4 == 0 {
            out.push(' ');
        }
        let _ = out.write_char(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_produces_the_same_people() {
        let a = Faker::new(7).person();
        let b = Faker::new(7).person();
        assert_eq!(a.email, b.email);
        assert_eq!(a.address, b.address);
        assert_ne!(Faker::new(8).person().email, a.email);
    }

    #[test]
    fn generated_cards_pass_the_luhn_check() {
        let mut f = Faker::new(1);
        for _ in 0..500 {
            let card = f.card("A B", 2026);
            assert!(luhn_valid(&card.number), "{}", card.number);
            assert!(matches!(card.number.len(), 15 | 16));
        }
        for known in TEST_CARDS.iter().chain(DECLINED_CARDS.iter().map(|(n, _)| n)) {
            assert!(luhn_valid(known), "{known}");
        }
        assert!(!luhn_valid("4111111111111112"));
    }

    #[test]
    fn generated_ibans_pass_mod_97_and_a_known_one_does_too() {
        let mut f = Faker::new(2);
        for country in Country::ALL {
            for _ in 0..50 {
                let iban = f.iban(country);
                assert!(iban_valid(&iban), "{iban}");
                assert!(iban_valid(&iban_grouped(&iban)));
            }
        }
        assert!(iban_valid("GB82 WEST 1234 5698 7654 32"));
        assert!(!iban_valid("GB82 WEST 1234 5698 7654 33"));
    }

    #[test]
    fn ssns_avoid_never_issued_ranges() {
        let mut f = Faker::new(3);
        for _ in 0..1000 {
            let ssn = f.ssn();
            let area: u32 = ssn[..3].parse().unwrap();
            assert!(area != 0 && area != 666 && area < 900, "{ssn}");
            assert!(&ssn[4..6] != "00" && &ssn[7..] != "0000", "{ssn}");
        }
    }

    #[test]
    fn some_user_agents_and_gift_messages_exceed_the_string_limit() {
        let mut f = Faker::new(4);
        assert!((0..100).map(|_| f.user_agent()).any(|ua| ua.chars().count() > 255));
        assert!(f.gift_message("Sam", true).chars().count() > 255);
    }
}
