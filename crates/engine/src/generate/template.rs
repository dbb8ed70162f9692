//! Chat templates: a model's own Jinja template (from GGUF `tokenizer.chat_template` or
//! `tokenizer_config.json`) turns messages into the prompt text it was trained on.
//!
//! Rendered with minijinja set up as Hugging Face transformers sets up Jinja for templates
//! (`trim_blocks`, `lstrip_blocks`, loop controls, Python string methods), with the helpers real
//! templates call: `raise_exception` (a refusal, answered 400), `strftime_now`, and a `tojson`
//! that writes JSON as Python's `json.dumps` does (`", "` and `": "` separators, no ASCII or HTML
//! escaping), since that is what the models saw in training.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

/// One message, as the template sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// Why a template did not render.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template refused the messages (`raise_exception`): the client's fault.
    #[error("the model's chat template refused the messages: {0}")]
    Refused(String),
    /// The template itself is broken or uses something unsupported.
    #[error("the model's chat template failed: {0}")]
    Broken(String),
}

const NAME: &str = "chat";
/// Marks errors from `raise_exception` (the template refusing its input).
const RAISED: &str = "raised by the template: ";

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the texts of the model's BOS and EOS tokens.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError::Broken(e.to_string()))?;
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, format!("{RAISED}{message}")))
        });
        env.add_function("strftime_now", |format: String| strftime(&format, now_utc()));
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string()).map_err(|e| TemplateError::Broken(e.to_string()))?;
        Ok(Self { env, bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    /// The prompt for `messages`; `add_generation_prompt` opens the assistant's turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self.env.get_template(NAME).map_err(|e| TemplateError::Broken(e.to_string()))?;
        let context = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        template.render(context).map_err(|e| match e.detail().and_then(|d| d.strip_prefix(RAISED)) {
            Some(message) => TemplateError::Refused(message.to_string()),
            None => TemplateError::Broken(format!("{e:#}")),
        })
    }
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, as transformers' `tojson`
/// (`indent` and `sort_keys` keywords; `ensure_ascii` and `separators` are accepted).
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<Value> = kwargs.get("ensure_ascii")?;
    let _: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let invalid = |e: serde_json::Error| Error::new(ErrorKind::InvalidOperation, e.to_string());
    // serde_json's `Value` keeps keys sorted; minijinja's maps keep template order.
    let value = if sort_keys == Some(true) {
        Value::from(minijinja::value::Serde(serde_json::to_value(&value).map_err(invalid)?))
    } else {
        value
    };
    let mut out = Vec::new();
    match indent {
        Some(width) => {
            let spaces = " ".repeat(width);
            let formatter = serde_json::ser::PrettyFormatter::with_indent(spaces.as_bytes());
            value
                .serialize(&mut serde_json::Serializer::with_formatter(&mut out, formatter))
                .map_err(invalid)?;
        }
        None => value
            .serialize(&mut serde_json::Serializer::with_formatter(&mut out, PythonFormatter))
            .map_err(invalid)?,
    }
    Ok(Value::from_safe_string(String::from_utf8(out).unwrap_or_default()))
}

/// `", "` between items and `": "` after keys, as Python's default separators.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// Seconds since the epoch, UTC.
fn now_utc() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// The subset of C's `strftime` that chat templates use (`%Y %m %d %H %M %S %b %B %a %A %y %j %%`),
/// in UTC; other directives are kept as written.
fn strftime(format: &str, epoch_seconds: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let days = epoch_seconds.div_euclid(86_400);
    let secs = epoch_seconds.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let is_leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let day_of_year = cumulative[(month - 1) as usize] + day + i64::from(is_leap && month > 2);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn user(content: &str) -> ChatMessage {
        ChatMessage { role: "user".into(), content: content.into() }
    }

    #[test]
    fn renders_chatml_with_a_generation_prompt() {
        let template = ChatTemplate::new(CHATML, "<|im_start|>", "<|im_end|>").unwrap();
        let text = template.render(&[user("Hi!")], true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn helpers_real_templates_call() {
        let source = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with a user message') }}{% endif %}\
            {{ messages | tojson }}|{{ {'a': [1, 'é']} | tojson(indent=2) }}|{{ ' x '.strip() }}|{{ 'abc'.startswith('a') }}|{{ bos_token }}";
        let template = ChatTemplate::new(source, "<s>", "</s>").unwrap();
        let text = template.render(&[user("q")], false).unwrap();
        assert_eq!(
            text,
            "[{\"role\": \"user\", \"content\": \"q\"}]|{\n  \"a\": [\n    1,\n    \"é\"\n  ]\n}|x|True|<s>"
        );
        let refused =
            template.render(&[ChatMessage { role: "assistant".into(), content: "a".into() }], false);
        match refused {
            Err(TemplateError::Refused(message)) => {
                assert_eq!(message, "Conversation must start with a user message")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(ChatTemplate::new("{% for %}", "", ""), Err(TemplateError::Broken(_))));
    }

    #[test]
    fn strftime_formats_dates() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_722_085_509 - 86_400 * 2;
        assert_eq!(strftime("%d %b %Y", t), "25 Jul 2024");
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %A %a %B %j %y %%", 1_722_085_509),
            "2024-07-27 13:05:09 Saturday Sat July 209 24 %"
        );
        assert_eq!(strftime("%d %B %Y", 951_782_400), "29 February 2000");
    }
}
