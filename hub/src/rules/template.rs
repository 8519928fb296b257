//! Command payload templates: a TOML table rendered to JSON once at load time, with holes
//! where a string holds `{{ field }}`.
//!
//! - A string that is exactly one placeholder (`"{{ score }}"`) becomes the field's JSON
//!   value: a number stays a number, a string is quoted and escaped, a missing field is `null`.
//! - A placeholder inside a longer string (`"seen by {{ device }}"`) is substituted into
//!   that string, JSON-escaped (quotes, backslashes, control characters); a missing field
//!   renders as nothing.
//!
//! Field names: `device`, `event` (the topic's event name), `class` (`label`, Frigate's name
//! for it), `score`, `model`, `ts`, `id`, `type`, `sub_label` and `sub_score` (a camera head's
//! verdict), `rule`, any other top-level field of the event JSON, and for state and
//! availability triggers `attribute`, `value`, `from`, `availability`.

use std::fmt::Write as _;

/// Most placeholders one payload may hold.
pub const MAX_PLACEHOLDERS: usize = 32;

/// A value a placeholder resolves to.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    /// A string (quoted and escaped when rendered).
    Str(&'a str),
    /// A number.
    Num(f64),
    /// Any JSON value (from an event field or a state).
    Json(serde_json::Value),
}

/// Where placeholders take their values from.
pub trait Fields {
    /// The value of `name`, if any.
    fn field(&self, name: &str) -> Option<Value<'_>>;
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    /// Ready JSON text.
    Lit(String),
    /// A whole JSON value.
    Value(String),
    /// Text inside a JSON string.
    InString(String),
}

/// A compiled payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
    /// Placeholder names, in order.
    fields: Vec<String>,
}

/// Appends `s` JSON-escaped (without quotes).
pub fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

fn is_field_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Splits a string into literal text and placeholder names; `None` when it has none.
fn split(s: &str) -> Result<Option<Vec<(bool, &str)>>, String> {
    if !s.contains("{{") {
        if s.contains("}}") {
            return Err(format!("`{s}`: `}}}}` without `{{{{`"));
        }
        return Ok(None);
    }
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("{{") {
        if i > 0 {
            out.push((false, &rest[..i]));
        }
        let after = &rest[i + 2..];
        let Some(j) = after.find("}}") else {
            return Err(format!("`{s}`: `{{{{` without `}}}}`"));
        };
        let name = after[..j].trim();
        if !is_field_name(name) {
            return Err(format!(
                "`{s}`: `{{{{ {name} }}}}` is not a field name ([A-Za-z0-9_-], e.g. {{{{ score }}}})"
            ));
        }
        out.push((true, name));
        rest = &after[j + 2..];
    }
    if rest.contains("}}") {
        return Err(format!("`{s}`: `}}}}` without `{{{{`"));
    }
    if !rest.is_empty() {
        out.push((false, rest));
    }
    Ok(Some(out))
}

struct Builder {
    parts: Vec<Part>,
    lit: String,
    fields: Vec<String>,
}

impl Builder {
    fn hole(&mut self, p: Part, name: &str) {
        if !self.lit.is_empty() {
            self.parts.push(Part::Lit(std::mem::take(&mut self.lit)));
        }
        self.parts.push(p);
        self.fields.push(name.to_string());
    }

    fn string(&mut self, s: &str) -> Result<(), String> {
        match split(s)? {
            None => {
                self.lit.push('"');
                escape_into(&mut self.lit, s);
                self.lit.push('"');
            }
            Some(pieces) if pieces.len() == 1 && pieces[0].0 => {
                self.hole(Part::Value(pieces[0].1.to_string()), pieces[0].1);
            }
            Some(pieces) => {
                self.lit.push('"');
                for (hole, text) in pieces {
                    if hole {
                        self.hole(Part::InString(text.to_string()), text);
                    } else {
                        escape_into(&mut self.lit, text);
                    }
                }
                self.lit.push('"');
            }
        }
        Ok(())
    }

    fn value(&mut self, v: &toml::Value) -> Result<(), String> {
        match v {
            toml::Value::String(s) => self.string(s)?,
            toml::Value::Integer(i) => {
                let _ = write!(self.lit, "{i}");
            }
            toml::Value::Float(f) => {
                if !f.is_finite() {
                    return Err("payload numbers must be finite".into());
                }
                self.lit
                    .push_str(&serde_json::to_string(f).map_err(|e| e.to_string())?);
            }
            toml::Value::Boolean(b) => {
                let _ = write!(self.lit, "{b}");
            }
            toml::Value::Datetime(_) => {
                return Err("payload cannot contain TOML dates (use strings)".into())
            }
            toml::Value::Array(a) => {
                self.lit.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        self.lit.push(',');
                    }
                    self.value(x)?;
                }
                self.lit.push(']');
            }
            toml::Value::Table(t) => {
                self.lit.push('{');
                for (i, (k, x)) in t.iter().enumerate() {
                    if i > 0 {
                        self.lit.push(',');
                    }
                    if k.contains("{{") {
                        return Err(format!("key `{k}`: placeholders go in values, not keys"));
                    }
                    self.lit.push('"');
                    escape_into(&mut self.lit, k);
                    self.lit.push_str("\":");
                    self.value(x)?;
                }
                self.lit.push('}');
            }
        }
        Ok(())
    }
}

impl Template {
    /// Compiles a TOML value (a command payload) into a template.
    pub fn compile(v: &toml::Value) -> Result<Template, String> {
        let mut b = Builder {
            parts: Vec::new(),
            lit: String::new(),
            fields: Vec::new(),
        };
        b.value(v)?;
        if b.fields.len() > MAX_PLACEHOLDERS {
            return Err(format!(
                "{} placeholders; at most {MAX_PLACEHOLDERS}",
                b.fields.len()
            ));
        }
        if !b.lit.is_empty() {
            b.parts.push(Part::Lit(b.lit));
        }
        Ok(Template {
            parts: b.parts,
            fields: b.fields,
        })
    }

    /// The placeholder names it uses.
    pub fn fields(&self) -> &[String] {
        &self.fields
    }

    /// Whether it has no placeholders (renders the same every time).
    pub fn is_constant(&self) -> bool {
        self.fields.is_empty()
    }

    /// Length of the literal text (the rendering without any field).
    pub fn literal_len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Lit(s) => s.len(),
                _ => 0,
            })
            .sum()
    }

    /// Renders the JSON text with values from `f`.
    pub fn render(&self, f: &dyn Fields) -> String {
        let mut out = String::with_capacity(self.literal_len() + 16 * self.fields.len());
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Value(name) => match f.field(name) {
                    None => out.push_str("null"),
                    Some(Value::Str(s)) => {
                        out.push('"');
                        escape_into(&mut out, s);
                        out.push('"');
                    }
                    Some(Value::Num(n)) => push_num(&mut out, n),
                    Some(Value::Json(v)) => out.push_str(&v.to_string()),
                },
                Part::InString(name) => match f.field(name) {
                    None => {}
                    Some(Value::Str(s)) => escape_into(&mut out, s),
                    Some(Value::Num(n)) => push_num(&mut out, n),
                    Some(Value::Json(serde_json::Value::String(s))) => escape_into(&mut out, &s),
                    Some(Value::Json(v)) => escape_into(&mut out, &v.to_string()),
                },
            }
        }
        out
    }
}

fn push_num(out: &mut String, n: f64) {
    if n.is_finite() {
        // f32 scores print as their shortest f32 form (0.93, not 0.9300000071525574).
        let f = n as f32;
        if f64::from(f) == n {
            let _ = write!(out, "{f}");
        } else {
            let _ = write!(out, "{n}");
        }
    } else {
        out.push_str("null");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct F;
    impl Fields for F {
        fn field(&self, name: &str) -> Option<Value<'_>> {
            match name {
                "score" => Some(Value::Num(f64::from(0.93f32))),
                "device" => Some(Value::Str("door-cam")),
                "evil" => Some(Value::Str("a\"b\\c\nd\u{1}")),
                "obj" => Some(Value::Json(serde_json::json!({"x": [1, "y"]}))),
                _ => None,
            }
        }
    }

    fn render(toml_text: &str) -> String {
        let v: toml::Value = toml::from_str(toml_text).unwrap();
        Template::compile(&v).unwrap().render(&F)
    }

    #[test]
    fn whole_values_keep_their_type_and_strings_are_escaped() {
        let out = render(
            "state = 'ON'\nscore = '{{ score }}'\nby = 'seen by {{device}} ({{ score }})'\n\
             evil = '{{ evil }}'\nin = 'x{{ evil }}y'\nmissing = '{{ nope }}'\ngone = '[{{ nope }}]'\n\
             obj = '{{ obj }}'\nnested = { list = [1, '{{ device }}'] }",
        );
        let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
        assert_eq!(v["state"], "ON");
        assert_eq!(v["score"], serde_json::json!(0.93));
        assert!(out.contains("\"score\":0.93,"), "{out}");
        assert_eq!(v["by"], "seen by door-cam (0.93)");
        assert_eq!(v["evil"], "a\"b\\c\nd\u{1}");
        assert_eq!(v["in"], "xa\"b\\c\nd\u{1}y");
        assert_eq!(v["missing"], serde_json::Value::Null);
        assert_eq!(v["gone"], "[]");
        assert_eq!(v["obj"]["x"][1], "y");
        assert_eq!(v["nested"]["list"][1], "door-cam");
    }

    #[test]
    fn constant_payloads_and_bad_placeholders() {
        let v: toml::Value = toml::from_str("state = 'ON'\nn = 3\nf = 0.5\nb = true").unwrap();
        let t = Template::compile(&v).unwrap();
        assert!(t.is_constant());
        assert_eq!(t.render(&F), r#"{"b":true,"f":0.5,"n":3,"state":"ON"}"#);
        for bad in [
            "x = '{{ score'",
            "x = '{{ a b }}'",
            "x = 'a }}'",
            "x = '{{}}'",
        ] {
            let v: toml::Value = toml::from_str(bad).unwrap();
            assert!(Template::compile(&v).is_err(), "{bad}");
        }
    }
}
