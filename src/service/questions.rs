//! The form of a question from the agent (an ACP elicitation's `requestedSchema`): reading its
//! fields for display, checking an answer against it, and turning what a person typed into an
//! answer.
//!
//! An ACP form is a flat object of fields, each a string (optionally one of a list of values),
//! a number, an integer, a boolean, or an array of strings from a list (multi-select), with a
//! list of required fields. That is the whole language; a field of a type gorp does not know
//! takes any value (the agent checks it).
//!
//! # Typed answers
//! People answer in a room or on a command line with text; [`from_text`] reads it:
//! - a JSON object (`{"question_0": "Redis"}`) is the answer as it is;
//! - `name=value` pairs separated by `;` set those fields (values read by the field's type);
//! - any other text answers the first field that has choices, by number (`2`) or by value or
//!   title (case does not matter); for a multi-select, a comma-separated list of those;
//! - text that is none of the choices goes to the first free-text field (Claude's "Other"
//!   box), or to the only field when the form has one.

use serde_json::{json, Map, Value};

/// One field of a form, for display.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub name: String,
    pub title: Option<String>,
    pub description: Option<String>,
    /// `string`, `number`, `integer`, `boolean`, `array`, or the type the agent named.
    pub kind: String,
    /// The choices of a string or multi-select field: `(value, title)`.
    pub choices: Vec<(String, String)>,
    pub required: bool,
}

impl Field {
    /// The title, else the name.
    pub fn label(&self) -> &str {
        self.title.as_deref().unwrap_or(&self.name)
    }

    fn multi(&self) -> bool {
        self.kind == "array"
    }
}

/// The fields of `schema`, in the order the form lists them.
pub fn fields(schema: &Value) -> Vec<Field> {
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(props) = schema["properties"].as_object() else {
        return Vec::new();
    };
    props
        .iter()
        .map(|(name, p)| {
            let text = |v: &Value| v.as_str().map(String::from);
            let kind = text(&p["type"]).unwrap_or_else(|| "string".into());
            let list = if kind == "array" { &p["items"] } else { p };
            let mut choices: Vec<(String, String)> = ["oneOf", "anyOf"]
                .iter()
                .filter_map(|k| list[*k].as_array())
                .flatten()
                .filter_map(|o| {
                    let v = o["const"].as_str()?;
                    Some((v.to_string(), o["title"].as_str().unwrap_or(v).to_string()))
                })
                .collect();
            if choices.is_empty() {
                choices = list["enum"]
                    .as_array()
                    .map(|e| {
                        e.iter()
                            .filter_map(Value::as_str)
                            .map(|v| (v.to_string(), v.to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
            }
            Field {
                name: name.clone(),
                title: text(&p["title"]),
                description: text(&p["description"]),
                kind,
                choices,
                required: required.contains(&name.as_str()),
            }
        })
        .collect()
}

/// Checks `content` against the form `schema`; the content to answer the agent with, or why it
/// does not fit (naming the field and what it takes).
pub fn check(schema: &Value, content: &Value) -> Result<Value, String> {
    let Some(obj) = content.as_object() else {
        return Err("an answer is a JSON object of field name to value".into());
    };
    let fields = fields(schema);
    let names = || {
        fields
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (name, value) in obj {
        let Some(f) = fields.iter().find(|f| f.name == *name) else {
            return Err(format!(
                "the form has no field {name:?}; its fields: {}",
                names()
            ));
        };
        check_value(f, &schema["properties"][name], value)?;
    }
    if let Some(missing) = fields
        .iter()
        .find(|f| f.required && !obj.contains_key(&f.name))
    {
        return Err(format!("field {:?} is required", missing.name));
    }
    Ok(content.clone())
}

fn check_value(f: &Field, p: &Value, v: &Value) -> Result<(), String> {
    let name = &f.name;
    let bound = |key: &str| p[key].as_f64();
    let within = |x: f64| -> Result<(), String> {
        if bound("minimum").is_some_and(|m| x < m) || bound("maximum").is_some_and(|m| x > m) {
            return Err(format!(
                "field {name:?} must be between {} and {}",
                p["minimum"], p["maximum"]
            ));
        }
        Ok(())
    };
    let choice = |s: &str| -> Result<(), String> {
        if f.choices.is_empty() || f.choices.iter().any(|(c, _)| c == s) {
            Ok(())
        } else {
            Err(format!(
                "field {name:?} takes one of {}, not {s:?}",
                quoted(f.choices.iter().map(|(c, _)| c.as_str()))
            ))
        }
    };
    match f.kind.as_str() {
        "string" => {
            let Some(s) = v.as_str() else {
                return Err(format!("field {name:?} takes text"));
            };
            let n = s.chars().count() as f64;
            if bound("minLength").is_some_and(|m| n < m)
                || bound("maxLength").is_some_and(|m| n > m)
            {
                return Err(format!(
                    "field {name:?} takes {} to {} characters",
                    p["minLength"].as_u64().unwrap_or(0),
                    p["maxLength"]
                ));
            }
            choice(s)
        }
        "number" => within(
            v.as_f64()
                .ok_or_else(|| format!("field {name:?} takes a number"))?,
        ),
        "integer" => within(
            v.as_i64()
                .ok_or_else(|| format!("field {name:?} takes a whole number"))? as f64,
        ),
        "boolean" => v
            .is_boolean()
            .then_some(())
            .ok_or_else(|| format!("field {name:?} takes true or false")),
        "array" => {
            let items = v
                .as_array()
                .filter(|a| a.iter().all(Value::is_string))
                .ok_or_else(|| format!("field {name:?} takes a list of text values"))?;
            let n = items.len() as f64;
            if bound("minItems").is_some_and(|m| n < m) || bound("maxItems").is_some_and(|m| n > m)
            {
                return Err(format!(
                    "field {name:?} takes {} to {} choices",
                    p["minItems"].as_u64().unwrap_or(0),
                    p["maxItems"]
                ));
            }
            items
                .iter()
                .try_for_each(|i| choice(i.as_str().unwrap_or_default()))
        }
        _ => Ok(()),
    }
}

fn quoted<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads a typed answer (see the module docs) and checks it against `schema`.
pub fn from_text(schema: &Value, text: &str) -> Result<Value, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("the answer is empty".into());
    }
    if text.starts_with('{') {
        let v: Value =
            serde_json::from_str(text).map_err(|e| format!("the answer is not JSON: {e}"))?;
        return check(schema, &v);
    }
    let fields = fields(schema);
    let pairs: Vec<(&str, &str)> = text
        .split(';')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    if !pairs.is_empty()
        && pairs.len() == text.split(';').filter(|p| !p.trim().is_empty()).count()
        && pairs
            .iter()
            .all(|(k, _)| fields.iter().any(|f| f.name == *k))
    {
        let mut content = Map::new();
        for (k, v) in pairs {
            let f = fields.iter().find(|f| f.name == k).expect("checked");
            content.insert(k.to_string(), typed(f, v)?);
        }
        return check(schema, &Value::Object(content));
    }
    let mut content = Map::new();
    if let Some(f) = fields.iter().find(|f| !f.choices.is_empty()) {
        if let Some(v) = pick(f, text) {
            content.insert(f.name.clone(), v);
            return check(schema, &Value::Object(content));
        }
    }
    let free = fields
        .iter()
        .find(|f| f.kind == "string" && f.choices.is_empty())
        .or(match fields.as_slice() {
            [only] => Some(only),
            _ => None,
        });
    match free {
        Some(f) => {
            content.insert(f.name.clone(), typed(f, text)?);
            check(schema, &Value::Object(content))
        }
        None => Err(format!(
            "{text:?} is none of the choices; answer with {}",
            hint(&fields)
        )),
    }
}

/// The choice(s) `text` names in a field with choices: numbers from 1, values or titles.
fn pick(f: &Field, text: &str) -> Option<Value> {
    let one = |t: &str| -> Option<String> {
        let t = t.trim();
        if let Ok(n) = t.parse::<usize>() {
            return f.choices.get(n.checked_sub(1)?).map(|(v, _)| v.clone());
        }
        f.choices
            .iter()
            .find(|(v, title)| v.eq_ignore_ascii_case(t) || title.eq_ignore_ascii_case(t))
            .map(|(v, _)| v.clone())
    };
    if f.multi() {
        let picks: Option<Vec<String>> = text.split(',').map(one).collect();
        picks.map(|p| json!(p))
    } else {
        one(text).map(Value::String)
    }
}

/// `value` read as the field's type.
fn typed(f: &Field, value: &str) -> Result<Value, String> {
    let name = &f.name;
    Ok(match f.kind.as_str() {
        "number" => json!(value
            .parse::<f64>()
            .map_err(|_| format!("field {name:?} takes a number, not {value:?}"))?),
        "integer" => json!(value
            .parse::<i64>()
            .map_err(|_| format!("field {name:?} takes a whole number, not {value:?}"))?),
        "boolean" => match value.to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "1" => json!(true),
            "false" | "no" | "n" | "0" => json!(false),
            _ => return Err(format!("field {name:?} takes yes or no, not {value:?}")),
        },
        _ if !f.choices.is_empty() => {
            pick(f, value).ok_or_else(|| format!("{value:?} is not a choice of field {name:?}"))?
        }
        "array" => json!(value.split(',').map(str::trim).collect::<Vec<_>>()),
        _ => json!(value),
    })
}

/// How to answer a form with these fields, in a sentence.
pub fn hint(fields: &[Field]) -> String {
    match fields.iter().find(|f| !f.choices.is_empty()) {
        Some(f) if f.multi() => format!(
            "the numbers of your choices for {:?}, separated by commas, or name=value pairs, or a JSON object",
            f.label()
        ),
        Some(f) => format!(
            "the number or the text of a choice for {:?}, or name=value pairs, or a JSON object",
            f.label()
        ),
        None => "your text, or name=value pairs separated by ;, or a JSON object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The form the Claude agent sends for one AskUserQuestion question.
    fn claude_form() -> Value {
        json!({
            "type": "object",
            "properties": {
                "question_0": { "type": "string", "title": "Cache", "oneOf": [
                    { "const": "Redis", "title": "Redis", "description": "in memory" },
                    { "const": "SQLite", "title": "SQLite" } ] },
                "question_0_custom": { "type": "string", "title": "Other" }
            }
        })
    }

    #[test]
    fn a_typed_answer_picks_by_number_or_text_and_else_goes_to_the_free_field() {
        let f = claude_form();
        assert_eq!(from_text(&f, "2"), Ok(json!({ "question_0": "SQLite" })));
        assert_eq!(
            from_text(&f, " redis "),
            Ok(json!({ "question_0": "Redis" }))
        );
        assert_eq!(
            from_text(&f, "Memcached, please"),
            Ok(json!({ "question_0_custom": "Memcached, please" }))
        );
        assert_eq!(
            from_text(&f, "question_0=1; question_0_custom=fast"),
            Ok(json!({ "question_0": "Redis", "question_0_custom": "fast" }))
        );
        assert_eq!(
            from_text(&f, r#"{"question_0": "SQLite"}"#),
            Ok(json!({ "question_0": "SQLite" }))
        );
        assert!(from_text(&f, "").is_err());
        // 3 is no choice, so it is free text.
        assert_eq!(from_text(&f, "3"), Ok(json!({ "question_0_custom": "3" })));
    }

    #[test]
    fn answers_that_do_not_fit_are_refused_with_the_reason() {
        let f = claude_form();
        let err = check(&f, &json!({ "question_0": "Mongo" })).unwrap_err();
        assert_eq!(
            err,
            r#"field "question_0" takes one of "Redis", "SQLite", not "Mongo""#
        );
        let err = check(&f, &json!({ "nope": "x" })).unwrap_err();
        assert!(err.contains("no field \"nope\""), "{err}");
        assert!(check(&f, &json!("Redis")).is_err());
        assert!(check(&f, &json!({ "question_0": 3 })).is_err());
        assert!(from_text(&f, "{not json").unwrap_err().contains("not JSON"));
        let typed = json!({
            "type": "object",
            "properties": {
                "n": { "type": "integer", "minimum": 1, "maximum": 5 },
                "ok": { "type": "boolean" },
                "tags": { "type": "array", "items": { "enum": ["a", "b"] }, "maxItems": 1 }
            },
            "required": ["n"]
        });
        assert!(check(&typed, &json!({ "ok": true }))
            .unwrap_err()
            .contains("required"));
        assert!(check(&typed, &json!({ "n": 9 })).is_err());
        assert!(check(&typed, &json!({ "n": 2.5 })).is_err());
        assert!(check(&typed, &json!({ "n": 2, "tags": ["a", "b"] })).is_err());
        assert_eq!(
            from_text(&typed, "n=3; ok=yes; tags=b"),
            Ok(json!({ "n": 3, "ok": true, "tags": ["b"] }))
        );
        assert!(from_text(&typed, "n=x")
            .unwrap_err()
            .contains("whole number"));
        // A multi-select picks by numbers; the required field is still missing.
        assert_eq!(
            from_text(&typed, "2").unwrap_err(),
            "field \"n\" is required"
        );
    }

    #[test]
    fn fields_list_choices_from_one_of_enum_and_array_items() {
        let f = fields(&claude_form());
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].label(), "Cache");
        assert_eq!(f[0].choices[1], ("SQLite".into(), "SQLite".into()));
        assert!(f[1].choices.is_empty());
        let multi = fields(&json!({ "properties": { "m": { "type": "array",
            "items": { "anyOf": [ { "const": "x", "title": "Ex" } ] } } } }));
        assert_eq!(multi[0].choices, vec![("x".into(), "Ex".into())]);
    }
}
