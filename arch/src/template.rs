//! Firecracker-compatible custom CPU templates: JSON that sets chosen CPUID and MSR bits.
//!
//! ```json
//! {
//!   "cpuid_modifiers": [
//!     { "leaf": "0x1", "subleaf": "0x0", "flags": 0,
//!       "modifiers": [ { "register": "ecx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0" } ] }
//!   ],
//!   "msr_modifiers": [ { "addr": "0x10a", "bitmap": "0b<64 characters of 0, 1 or x>" } ]
//! }
//! ```
//!
//! A bitmap is `0b` followed by exactly 32 (CPUID register) or 64 (MSR) characters, most
//! significant bit first: `0` or `1` set the bit, `x` keeps the value KVM (or the vCPU)
//! has. Underscores may separate groups of bits, as Firecracker allows. Numbers (`leaf`,
//! `subleaf`, `flags`, `addr`) are JSON numbers or strings in hex (`0x..`), binary (`0b..`)
//! or decimal. Unknown fields are rejected. `flags` (KVM's CPUID entry flags) is accepted for
//! compatibility and not applied: a modified entry keeps the flags KVM reported.

use kvm_bindings::{kvm_msr_entry, CpuId};
use serde::Deserialize;

/// Errors in a CPU template or while applying it.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The JSON is malformed, has unknown fields or wrong types.
    #[error("cannot parse the cpu template")]
    Json(#[source] serde_json::Error),
    /// A number field is not a valid number of its width.
    #[error("{field}: {value:?} is not a {bits}-bit hex (0x..), binary (0b..) or decimal number")]
    InvalidNumber {
        /// Path of the field.
        field: String,
        /// The text found.
        value: String,
        /// Width of the field.
        bits: u32,
    },
    /// A bitmap is malformed.
    #[error("{field}: {value:?} is not a valid bitmap: {reason}")]
    InvalidBitmap {
        /// Path of the field.
        field: String,
        /// The text found.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A CPUID register name is not eax, ebx, ecx or edx.
    #[error("{field}: {value:?} is not one of eax, ebx, ecx, edx")]
    InvalidRegister {
        /// Path of the field.
        field: String,
        /// The text found.
        value: String,
    },
    /// The same leaf/subleaf, register or MSR appears twice.
    #[error("{field}: {what} is modified more than once")]
    Duplicate {
        /// Path of the field.
        field: String,
        /// What is duplicated.
        what: String,
    },
    /// The template modifies a CPUID leaf the vCPU does not have.
    #[error("cpuid leaf {leaf:#x} subleaf {subleaf:#x} is modified by the template but absent")]
    MissingCpuidLeaf {
        /// The leaf.
        leaf: u32,
        /// The subleaf.
        subleaf: u32,
    },
    /// The template keeps bits of an MSR whose current value is unknown.
    #[error("msr {0:#x} keeps bits from its current value, which is unknown")]
    UnknownMsrValue(u32),
}

/// Which bits a template sets and to what: bits set in `filter` take their value from
/// `value`, the others are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BitFilter {
    /// Bits the template sets.
    pub filter: u64,
    /// Their values (only bits in `filter` are meaningful).
    pub value: u64,
}

impl BitFilter {
    /// Applies the filter to `current`.
    pub fn apply(&self, current: u64) -> u64 {
        (current & !self.filter) | (self.value & self.filter)
    }

    /// Applies the filter to a 32-bit register.
    pub fn apply_u32(&self, current: u32) -> u32 {
        let applied = self.apply(u64::from(current)) & u64::from(u32::MAX);
        u32::try_from(applied).expect("masked to 32 bits")
    }
}

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuidRegister {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// Bits to set in one register of a CPUID leaf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuidRegisterModifier {
    /// The register.
    pub register: CpuidRegister,
    /// Its bits.
    pub bitmap: BitFilter,
}

/// Modifications of one CPUID leaf/subleaf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuidLeafModifier {
    /// CPUID function (EAX input).
    pub leaf: u32,
    /// CPUID index (ECX input).
    pub subleaf: u32,
    /// KVM CPUID entry flags as written in the template (not applied).
    pub flags: u32,
    /// Register modifications.
    pub modifiers: Vec<CpuidRegisterModifier>,
}

/// Bits to set in one MSR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsrModifier {
    /// MSR index.
    pub addr: u32,
    /// Its bits.
    pub bitmap: BitFilter,
}

/// A parsed custom CPU template.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuTemplate {
    /// CPUID modifications.
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    /// MSR modifications.
    pub msr_modifiers: Vec<MsrModifier>,
}

/// A number as JSON has it: a number or a string to parse (anything else is reported with
/// the field's path by [`parse_u32`]).
type RawNumber = serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    #[serde(default)]
    cpuid_modifiers: Vec<RawLeafModifier>,
    #[serde(default)]
    msr_modifiers: Vec<RawMsrModifier>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLeafModifier {
    leaf: RawNumber,
    subleaf: RawNumber,
    flags: RawNumber,
    modifiers: Vec<RawRegisterModifier>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegisterModifier {
    register: String,
    bitmap: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMsrModifier {
    addr: RawNumber,
    bitmap: String,
}

fn parse_u32(field: String, raw: &RawNumber) -> Result<u32, TemplateError> {
    let (parsed, text) = match raw {
        RawNumber::Number(n) => (
            n.as_u64().and_then(|n| u32::try_from(n).ok()),
            n.to_string(),
        ),
        RawNumber::String(s) => {
            let parsed = if let Some(hex) = s.strip_prefix("0x") {
                u32::from_str_radix(hex, 16).ok()
            } else if let Some(bin) = s.strip_prefix("0b") {
                u32::from_str_radix(bin, 2).ok()
            } else {
                s.parse::<u32>().ok()
            };
            (parsed, s.clone())
        }
        other => (None, other.to_string()),
    };
    parsed.ok_or(TemplateError::InvalidNumber {
        field,
        value: text,
        bits: 32,
    })
}

/// Parses a `0b` bitmap of exactly `bits` characters of 0, 1 or x (underscores ignored).
fn parse_bitmap(field: String, text: &str, bits: u32) -> Result<BitFilter, TemplateError> {
    let invalid = |reason: String| TemplateError::InvalidBitmap {
        field: field.clone(),
        value: text.to_string(),
        reason,
    };
    let digits = text
        .strip_prefix("0b")
        .ok_or_else(|| invalid("it does not start with 0b".into()))?;
    let mut filter = BitFilter::default();
    let mut count = 0u32;
    for c in digits.chars().filter(|c| *c != '_') {
        if count == bits {
            return Err(invalid(format!("it has more than {bits} bits")));
        }
        filter.filter <<= 1;
        filter.value <<= 1;
        match c {
            'x' => {}
            '0' => filter.filter |= 1,
            '1' => {
                filter.filter |= 1;
                filter.value |= 1;
            }
            other => return Err(invalid(format!("{other:?} is not 0, 1 or x"))),
        }
        count += 1;
    }
    if count != bits {
        return Err(invalid(format!("it has {count} bits instead of {bits}")));
    }
    Ok(filter)
}

fn parse_register(field: String, text: &str) -> Result<CpuidRegister, TemplateError> {
    match text {
        "eax" => Ok(CpuidRegister::Eax),
        "ebx" => Ok(CpuidRegister::Ebx),
        "ecx" => Ok(CpuidRegister::Ecx),
        "edx" => Ok(CpuidRegister::Edx),
        _ => Err(TemplateError::InvalidRegister {
            field,
            value: text.to_string(),
        }),
    }
}

fn parse_leaf(i: usize, raw: &RawLeafModifier) -> Result<CpuidLeafModifier, TemplateError> {
    let path = format!("cpuid_modifiers[{i}]");
    let mut leaf = CpuidLeafModifier {
        leaf: parse_u32(format!("{path}.leaf"), &raw.leaf)?,
        subleaf: parse_u32(format!("{path}.subleaf"), &raw.subleaf)?,
        flags: parse_u32(format!("{path}.flags"), &raw.flags)?,
        modifiers: Vec::with_capacity(raw.modifiers.len()),
    };
    for (j, m) in raw.modifiers.iter().enumerate() {
        let path = format!("{path}.modifiers[{j}]");
        let register = parse_register(format!("{path}.register"), &m.register)?;
        if leaf.modifiers.iter().any(|r| r.register == register) {
            return Err(TemplateError::Duplicate {
                field: format!("{path}.register"),
                what: m.register.clone(),
            });
        }
        let bitmap = parse_bitmap(format!("{path}.bitmap"), &m.bitmap, 32)?;
        leaf.modifiers
            .push(CpuidRegisterModifier { register, bitmap });
    }
    Ok(leaf)
}

impl CpuTemplate {
    /// Parses a custom CPU template from its JSON text.
    pub fn from_json(text: &str) -> Result<Self, TemplateError> {
        let raw: RawTemplate = serde_json::from_str(text).map_err(TemplateError::Json)?;
        let mut template = CpuTemplate::default();
        for (i, raw_leaf) in raw.cpuid_modifiers.iter().enumerate() {
            let leaf = parse_leaf(i, raw_leaf)?;
            let seen = template
                .cpuid_modifiers
                .iter()
                .any(|l| (l.leaf, l.subleaf) == (leaf.leaf, leaf.subleaf));
            if seen {
                return Err(TemplateError::Duplicate {
                    field: format!("cpuid_modifiers[{i}]"),
                    what: format!("leaf {:#x} subleaf {:#x}", leaf.leaf, leaf.subleaf),
                });
            }
            template.cpuid_modifiers.push(leaf);
        }
        for (i, m) in raw.msr_modifiers.iter().enumerate() {
            let path = format!("msr_modifiers[{i}]");
            let addr = parse_u32(format!("{path}.addr"), &m.addr)?;
            if template.msr_modifiers.iter().any(|o| o.addr == addr) {
                return Err(TemplateError::Duplicate {
                    field: format!("{path}.addr"),
                    what: format!("msr {addr:#x}"),
                });
            }
            let bitmap = parse_bitmap(format!("{path}.bitmap"), &m.bitmap, 64)?;
            template.msr_modifiers.push(MsrModifier { addr, bitmap });
        }
        Ok(template)
    }

    /// Applies the CPUID modifiers to `cpuid`. Errors, changing nothing, if a modified
    /// leaf/subleaf is absent.
    pub fn apply_cpuid(&self, cpuid: &mut CpuId) -> Result<(), TemplateError> {
        let position = |cpuid: &CpuId, m: &CpuidLeafModifier| {
            cpuid
                .as_slice()
                .iter()
                .position(|e| e.function == m.leaf && e.index == m.subleaf)
                .ok_or(TemplateError::MissingCpuidLeaf {
                    leaf: m.leaf,
                    subleaf: m.subleaf,
                })
        };
        for m in &self.cpuid_modifiers {
            position(cpuid, m)?;
        }
        for m in &self.cpuid_modifiers {
            let i = position(cpuid, m)?;
            let entry = &mut cpuid.as_mut_slice()[i];
            for r in &m.modifiers {
                let reg = match r.register {
                    CpuidRegister::Eax => &mut entry.eax,
                    CpuidRegister::Ebx => &mut entry.ebx,
                    CpuidRegister::Ecx => &mut entry.ecx,
                    CpuidRegister::Edx => &mut entry.edx,
                };
                *reg = r.bitmap.apply_u32(*reg);
            }
        }
        Ok(())
    }

    /// The MSR values the template asks for, starting from `current(addr)` for bits it keeps.
    /// Errors if `current` does not know an MSR whose bits are not all set by the template.
    pub fn msr_entries(
        &self,
        current: impl Fn(u32) -> Option<u64>,
    ) -> Result<Vec<kvm_msr_entry>, TemplateError> {
        self.msr_modifiers
            .iter()
            .map(|m| {
                let base = if m.bitmap.filter == u64::MAX {
                    0
                } else {
                    current(m.addr).ok_or(TemplateError::UnknownMsrValue(m.addr))?
                };
                Ok(kvm_msr_entry {
                    index: m.addr,
                    data: m.bitmap.apply(base),
                    ..Default::default()
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_cpuid_entry2;

    use super::*;

    fn bits32(pattern: &str) -> String {
        format!("0b{pattern:x>32}")
    }

    fn bits64(pattern: &str) -> String {
        format!("0b{pattern:x>64}")
    }

    fn good_template() -> String {
        let msr_10a = format!("0b{}", "0".repeat(62) + "11");
        format!(
            r#"{{
              "cpuid_modifiers": [
                {{ "leaf": "0x1", "subleaf": "0x0", "flags": 0,
                   "modifiers": [
                     {{ "register": "ecx", "bitmap": "{}" }},
                     {{ "register": "edx", "bitmap": "{}" }}
                   ] }},
                {{ "leaf": "7", "subleaf": 0, "flags": "0x1",
                   "modifiers": [ {{ "register": "ebx", "bitmap": "{}" }} ] }}
              ],
              "msr_modifiers": [
                {{ "addr": "0x10a", "bitmap": "{}" }},
                {{ "addr": "0x1a0", "bitmap": "{}" }}
              ]
            }}"#,
            bits32("0x1"),
            bits32("1"),
            bits32("0"),
            msr_10a,
            bits64("1"),
        )
    }

    fn cpuid() -> CpuId {
        let entry = |function, index, regs: u32| kvm_cpuid_entry2 {
            function,
            index,
            eax: regs,
            ebx: regs,
            ecx: regs,
            edx: regs,
            ..Default::default()
        };
        CpuId::from_entries(&[entry(0x1, 0, 0xffff_0000), entry(0x7, 0, 0xffff_ffff)]).unwrap()
    }

    #[test]
    fn good_template_parses() {
        let t = CpuTemplate::from_json(&good_template()).unwrap();
        assert_eq!(t.cpuid_modifiers.len(), 2);
        let leaf1 = &t.cpuid_modifiers[0];
        assert_eq!((leaf1.leaf, leaf1.subleaf, leaf1.flags), (1, 0, 0));
        assert_eq!(leaf1.modifiers[0].register, CpuidRegister::Ecx);
        assert_eq!(
            leaf1.modifiers[0].bitmap,
            BitFilter {
                filter: 0b101,
                value: 0b001
            }
        );
        assert_eq!(
            (t.cpuid_modifiers[1].leaf, t.cpuid_modifiers[1].flags),
            (7, 1)
        );
        assert_eq!(t.msr_modifiers[0].addr, 0x10a);
        assert_eq!(t.msr_modifiers[0].bitmap.filter, u64::MAX);
        assert_eq!(t.msr_modifiers[0].bitmap.value, 3);
    }

    #[test]
    fn empty_template_is_valid() {
        assert_eq!(
            CpuTemplate::from_json("{}").unwrap(),
            CpuTemplate::default()
        );
    }

    #[test]
    fn underscores_separate_bit_groups() {
        let body = format!(
            r#"{{"msr_modifiers":[{{"addr":"0x10","bitmap":"0b{}"}}]}}"#,
            ["xxxxxxxx"; 8].join("_")
        );
        let t = CpuTemplate::from_json(&body).unwrap();
        assert_eq!(t.msr_modifiers[0].bitmap.filter, 0);
    }

    fn error_text(body: &str) -> String {
        let err = CpuTemplate::from_json(body).unwrap_err();
        let mut text = err.to_string();
        if let TemplateError::Json(e) = &err {
            text = format!("{text}: {e}");
        }
        text
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        assert!(error_text(r#"{"kvm_capabilities": []}"#).contains("kvm_capabilities"));
        let body = r#"{"cpuid_modifiers":[{"leaf":"0x1","subleaf":"0x0","flags":0,
            "modifiers":[],"extra":1}]}"#;
        assert!(error_text(body).contains("extra"));
        let body = r#"{"msr_modifiers":[{"addr":"0x1","bitmap":"0b1","mask":1}]}"#;
        assert!(error_text(body).contains("mask"));
    }

    #[test]
    fn malformed_bitmaps_name_the_field() {
        let cases = [
            (bits32("1").replace("0b", ""), "does not start with 0b"),
            (format!("0b{}", "1".repeat(31)), "31 bits instead of 32"),
            (format!("0b{}", "1".repeat(33)), "more than 32 bits"),
            (bits32("2"), "'2' is not 0, 1 or x"),
        ];
        for (bitmap, reason) in cases {
            let body = format!(
                r#"{{"cpuid_modifiers":[{{"leaf":"0x1","subleaf":"0x0","flags":0,
                    "modifiers":[{{"register":"eax","bitmap":"{bitmap}"}}]}}]}}"#
            );
            let text = error_text(&body);
            assert!(
                text.contains("cpuid_modifiers[0].modifiers[0].bitmap"),
                "{text}"
            );
            assert!(text.contains(reason), "{text}");
        }
        let body = format!(
            r#"{{"msr_modifiers":[{{"addr":"0x1","bitmap":"{}"}}]}}"#,
            bits32("")
        );
        let text = error_text(&body);
        assert!(text.contains("msr_modifiers[0].bitmap"), "{text}");
        assert!(text.contains("32 bits instead of 64"), "{text}");
    }

    #[test]
    fn bad_numbers_and_registers_name_the_field() {
        let leaf = |leaf: &str, register: &str| {
            format!(
                r#"{{"cpuid_modifiers":[{{"leaf":{leaf},"subleaf":"0x0","flags":0,
                    "modifiers":[{{"register":"{register}","bitmap":"{}"}}]}}]}}"#,
                bits32("")
            )
        };
        let text = error_text(&leaf(r#""0xzz""#, "eax"));
        assert!(text.contains("cpuid_modifiers[0].leaf"), "{text}");
        let text = error_text(&leaf("4294967296", "eax"));
        assert!(text.contains("cpuid_modifiers[0].leaf"), "{text}");
        for bad in [r#""-1""#, "-1", "1.5", "true", "[1]"] {
            let text = error_text(&leaf(bad, "eax"));
            assert!(text.contains("cpuid_modifiers[0].leaf"), "{bad}: {text}");
        }
        let text = error_text(&leaf(r#""0x1""#, "rax"));
        assert!(
            text.contains("cpuid_modifiers[0].modifiers[0].register"),
            "{text}"
        );
        let text = error_text(r#"{"msr_modifiers":[{"addr":"ten","bitmap":"0b1"}]}"#);
        assert!(text.contains("msr_modifiers[0].addr"), "{text}");
        let text = error_text(r#"{"cpuid_modifiers":[{"leaf":"0x1"}]}"#);
        assert!(text.contains("subleaf"), "{text}");
    }

    #[test]
    fn duplicates_are_rejected() {
        let body = format!(
            r#"{{"msr_modifiers":[{{"addr":"0x10","bitmap":"{b}"}},{{"addr":"16","bitmap":"{b}"}}]}}"#,
            b = bits64("")
        );
        assert!(error_text(&body).contains("msr_modifiers[1].addr"));
        let body = format!(
            r#"{{"cpuid_modifiers":[{{"leaf":"0x1","subleaf":"0x0","flags":0,"modifiers":[
                {{"register":"eax","bitmap":"{b}"}},{{"register":"eax","bitmap":"{b}"}}]}}]}}"#,
            b = bits32("")
        );
        assert!(error_text(&body).contains("modifiers[1].register"));
    }

    #[test]
    fn cpuid_modifiers_set_only_the_given_bits() {
        let t = CpuTemplate::from_json(&good_template()).unwrap();
        let mut c = cpuid();
        t.apply_cpuid(&mut c).unwrap();
        let leaf1 = c.as_slice()[0];
        assert_eq!(
            leaf1.ecx, 0xffff_0001,
            "bit 0 set, bit 2 cleared, rest kept"
        );
        assert_eq!(leaf1.edx, 0xffff_0001);
        assert_eq!(leaf1.eax, 0xffff_0000, "unmodified register kept");
        assert_eq!(c.as_slice()[1].ebx, 0xffff_fffe);
    }

    #[test]
    fn absent_leaf_is_an_error_and_changes_nothing() {
        let body = format!(
            r#"{{"cpuid_modifiers":[
                {{"leaf":"0x1","subleaf":"0x0","flags":0,"modifiers":[{{"register":"eax","bitmap":"{b}"}}]}},
                {{"leaf":"0xd","subleaf":"0x1","flags":1,"modifiers":[{{"register":"eax","bitmap":"{b}"}}]}}]}}"#,
            b = bits32("1")
        );
        let t = CpuTemplate::from_json(&body).unwrap();
        let mut c = cpuid();
        let err = t.apply_cpuid(&mut c).unwrap_err();
        assert!(matches!(
            err,
            TemplateError::MissingCpuidLeaf {
                leaf: 0xd,
                subleaf: 1
            }
        ));
        assert_eq!(c.as_slice()[0].eax, 0xffff_0000);
    }

    #[test]
    fn msr_entries_merge_with_current_values() {
        let t = CpuTemplate::from_json(&good_template()).unwrap();
        let entries = t
            .msr_entries(|addr| (addr == 0x1a0).then_some(0x80))
            .unwrap();
        assert_eq!((entries[0].index, entries[0].data), (0x10a, 3));
        assert_eq!((entries[1].index, entries[1].data), (0x1a0, 0x81));
        // 0x1a0 keeps bits, so its current value is needed.
        let err = t.msr_entries(|_| None).unwrap_err();
        assert!(matches!(err, TemplateError::UnknownMsrValue(0x1a0)));
    }
}
