//! Conditions of `if`/`else if`.

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::event::{logstash_text, LsEvent};
use super::plugins::{setting_list, setting_text};

fn is_reference(word: &Value) -> bool {
    word.as_str()
        .is_some_and(|w| w.starts_with('[') && w.ends_with(']'))
}

/// A condition: `[comparison|group] (and|or) ...`, `and` binding tighter.
pub(super) fn condition(event: &LsEvent, items: &[Value]) -> Result<bool> {
    let mut any = false;
    let mut all = true;
    let mut expect_operand = true;
    for item in items {
        if expect_operand {
            let value = operand(event, item)?;
            all &= value;
        } else {
            match item.as_str() {
                Some("and") => {}
                Some("or") => {
                    any |= all;
                    all = true;
                }
                other => bail!("unsupported boolean operator {other:?}"),
            }
        }
        expect_operand = !expect_operand;
    }
    ensure!(!expect_operand, "condition ends with an operator");
    Ok(any || all)
}

/// Logstash's truthiness of a field (`valueIsTruthy` in EventCondition.java):
/// false when absent or null, or when Java's text of the value is empty or
/// "false": so "", false and also the string "false". Any number (0 too), list
/// or map (even empty: Java writes `[]`, `{}` around them) is true.
fn truthy(event: &LsEvent, reference: &str) -> Result<bool> {
    Ok(match event.get(reference)? {
        None => false,
        Some(Value::String(s)) => !s.is_empty() && s != "false",
        Some(Value::Bool(b)) => *b,
        Some(_) => true,
    })
}

fn operand(event: &LsEvent, item: &Value) -> Result<bool> {
    let parts = item.as_array().context("condition operand is not a list")?;
    if parts.first().is_some_and(Value::is_array) {
        return condition(event, parts); // a parenthesized group
    }
    let word = |i: usize| parts.get(i).and_then(Value::as_str);
    let reference = |i: usize| -> Result<&str> {
        ensure!(
            parts.get(i).is_some_and(is_reference),
            "condition {item}: operand {i} is not a field reference"
        );
        Ok(word(i).unwrap_or_default())
    };
    let literal = |i: usize| -> Result<String> {
        let v = parts.get(i).context("missing operand")?;
        ensure!(
            !is_reference(v),
            "condition {item}: comparing two fields is not modelled"
        );
        setting_text(v, "condition literal")
    };
    // `"v" in [field]` (ConstantStringInField): a string field contains it, or
    // a list field holds that string (Ruby equality: not the number 5 for "5");
    // any other field does not.
    let field_contains = |field: &str, value: &str| -> Result<bool> {
        Ok(match event.get(field)? {
            Some(Value::String(s)) => s.contains(value),
            Some(Value::Array(items)) => items.iter().any(|item| item == value),
            _ => false,
        })
    };
    // `[field] in ["a", "b"]`: the field's text is one of them.
    let in_list = |field: &str, list: &Value| -> Result<bool> {
        let list = setting_list(list, "condition list")?;
        Ok(match event.get(field)? {
            None => false,
            Some(v) => list.contains(&logstash_text(v)?),
        })
    };
    // `[field] == "v"`: Ruby equality, so only a string field equals a string
    // (the integer 5 is not "5", false is not "false"); other literals are not
    // modelled.
    let equals = |field: &str, i: usize| -> Result<bool> {
        let value = parts.get(i).context("missing operand")?;
        ensure!(
            value.is_string() && !is_reference(value),
            "condition {item}: == or != with {value} is not modelled"
        );
        Ok(event.get(field)?.is_some_and(|v| v == value))
    };
    let ops: Vec<Option<&str>> = (0..parts.len()).map(word).collect();
    match (
        parts.len(),
        ops.get(1).copied().flatten(),
        ops.get(2).copied().flatten(),
    ) {
        (1, _, _) => truthy(event, reference(0)?),
        (2, _, _) if word(0) == Some("!") => match &parts[1] {
            Value::Array(group) => Ok(!condition(event, group)?),
            _ => Ok(!truthy(event, reference(1)?)?),
        },
        (3, Some("=="), _) => equals(reference(0)?, 2),
        (3, Some("!="), _) => Ok(!equals(reference(0)?, 2)?),
        (3, Some("in"), _) if parts[2].is_array() => in_list(reference(0)?, &parts[2]),
        (3, Some("in"), _) => field_contains(reference(2)?, &literal(0)?),
        (4, Some("not"), Some("in")) if parts[3].is_array() => {
            Ok(!in_list(reference(0)?, &parts[3])?)
        }
        (4, Some("not"), Some("in")) => Ok(!field_contains(reference(3)?, &literal(0)?)?),
        _ => bail!("condition {item} is not modelled"),
    }
}
