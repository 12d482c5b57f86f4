use std::io::Read;
fn main() {
    let r = periscope_redaction::Redactor::default_rules();
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s).unwrap();
    for line in s.lines() {
        let mut rep = periscope_redaction::Report::new();
        let out = r.redact_text(line, "t", &mut rep);
        let rules: Vec<_> = rep.findings().iter().map(|f| f.rule.as_str()).collect();
        println!("{line}\n  -> {out}  {rules:?}");
    }
}
