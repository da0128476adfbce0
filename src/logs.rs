//! Log lines, written directly for the common event.
//!
//! tracing-subscriber's formats write each field through `fmt` machinery
//! (the JSON one through serde_json and a `fmt::Write` adaptor): about 24k
//! instructions for the one line a request logs in JSON and 18k in text,
//! more than everything else toastgate adds to a bare proxy (README:
//! Benchmarks). [`FastJson`] and [`FastText`] write the same bytes
//! themselves for an event that is in no span and does not come from the
//! `log` crate (every request line at `info`), and hand every other event
//! to the stock format unchanged. Tests compare their lines with the stock
//! formats'.

use std::fmt::{self, Write as _};
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{DefaultFields, Format, Full, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent};
use tracing_subscriber::registry::LookupSpan;

/// tracing-subscriber's `json().flatten_event(true)` format, faster.
pub struct FastJson {
    stock: Format<Json>,
}

impl FastJson {
    pub fn new() -> Self {
        FastJson {
            stock: Format::default().json().flatten_event(true),
        }
    }
}

impl Default for FastJson {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> FormatEvent<S, JsonFields> for FastJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        if in_span_or_from_log(ctx, event) {
            return self.stock.format_event(ctx, writer, event);
        }
        let mut line = String::with_capacity(384);
        line.push_str("{\"timestamp\":\"");
        push_timestamp(&mut line, SystemTime::now());
        line.push_str("\",\"level\":\"");
        line.push_str(meta.level().as_str());
        line.push('"');
        let mut fields = JsonFieldsVisitor { line: &mut line };
        event.record(&mut fields);
        line.push_str(",\"target\":");
        push_json_str(&mut line, meta.target());
        line.push_str("}\n");
        writer.write_str(&line)
    }
}

/// In a span, the stock formats add the span's fields; from the `log` crate,
/// they read level and target from the record. Both are rare.
fn in_span_or_from_log<S, N>(ctx: &FmtContext<'_, S, N>, event: &Event<'_>) -> bool
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    event.parent().is_some()
        || ctx.lookup_current().is_some()
        || event.metadata().fields().field("log.target").is_some()
}

/// The event's fields as `,"name":value`, as tracing-serde's map visitor
/// writes them: strings and `Debug` values as JSON strings, integers,
/// floats (serde_json's way: `null` when not finite) and booleans as JSON
/// values; everything else (i128, u128, errors, bytes) by `Debug`, through
/// `record_debug`, as the stock visitor does by default.
struct JsonFieldsVisitor<'a> {
    line: &'a mut String,
}

impl JsonFieldsVisitor<'_> {
    fn key(&mut self, field: &Field) {
        self.line.push(',');
        push_json_str(self.line, field.name());
        self.line.push(':');
    }
}

impl Visit for JsonFieldsVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        push_json_str(self.line, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field);
        self.line.push('"');
        // Escaped as it is written, with no string of its own. A `Debug`
        // that fails leaves what it wrote (the stock format panics in
        // serde_json instead).
        let _ = write!(JsonEscaping(self.line), "{value:?}");
        self.line.push('"');
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.line, "{value}");
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = write!(self.line, "{value}");
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.line.push_str(if value { "true" } else { "false" });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        // serde_json's own way: zmij for a finite number, else `null`.
        if value.is_finite() {
            self.line.push_str(zmij::Buffer::new().format_finite(value));
        } else {
            self.line.push_str("null");
        }
    }
}

/// tracing-subscriber's default text format (`Format<Full>` with
/// `DefaultFields`), faster, when the line has no colours: colours are for a
/// person at a terminal, whose lines go to the stock format. It writes the
/// default layout (timestamp, level, target, fields; no thread names or
/// ids, no file or line) and honours the layer's `with_ansi` and
/// `with_ansi_sanitization`, the only settings `init_logging` makes.
pub struct FastText {
    stock: Format<Full>,
}

impl FastText {
    pub fn new() -> Self {
        FastText {
            stock: Format::default(),
        }
    }
}

impl Default for FastText {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> FormatEvent<S, DefaultFields> for FastText
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, DefaultFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if writer.has_ansi_escapes() || in_span_or_from_log(ctx, event) {
            return self.stock.format_event(ctx, writer, event);
        }
        let meta = event.metadata();
        let mut line = String::with_capacity(320);
        push_timestamp(&mut line, SystemTime::now());
        line.push(' ');
        // Padded to five, right-aligned, as the stock format's constants are.
        line.push_str(match *meta.level() {
            tracing::Level::TRACE => "TRACE",
            tracing::Level::DEBUG => "DEBUG",
            tracing::Level::INFO => " INFO",
            tracing::Level::WARN => " WARN",
            tracing::Level::ERROR => "ERROR",
        });
        line.push(' ');
        line.push_str(meta.target());
        line.push_str(": ");
        let mut fields = TextFieldsVisitor {
            line: &mut line,
            sanitize: writer.sanitizes_ansi_escapes(),
            started: false,
            unusual: false,
            failed: false,
        };
        event.record(&mut fields);
        if fields.unusual {
            return self.stock.format_event(ctx, writer, event);
        }
        if fields.failed {
            // As the stock format: the layer then writes its "Unable to
            // format" line instead of this one.
            return Err(fmt::Error);
        }
        line.push('\n');
        writer.write_str(&line)
    }
}

/// The event's fields as `DefaultFields` writes them without colours,
/// separated by one space: the message as it displays (ANSI and C1 control
/// characters escaped when the writer sanitizes them), every other field as
/// `name=` and its `Debug` (a `r#` name without the `r#`), and no `log.*`
/// field (what the `log` crate's records carry). An error field, which the
/// stock visitor writes with its chain of sources, marks the event
/// `unusual`: it goes to the stock format whole. A `Debug` or `Display`
/// that fails marks it `failed`.
struct TextFieldsVisitor<'a> {
    line: &'a mut String,
    sanitize: bool,
    started: bool,
    unusual: bool,
    failed: bool,
}

/// What [`TextFieldsVisitor::start`] found the field to be.
#[derive(PartialEq)]
enum TextField {
    /// Left out, as the stock visitor leaves out `log.*` fields.
    Skipped,
    /// The message: its value alone.
    Message,
    /// Any other field: `name=` written, its value next.
    Named,
}

impl TextFieldsVisitor<'_> {
    /// Starts the field: the separating space, then `name=` unless it is
    /// the message.
    fn start(&mut self, field: &Field) -> TextField {
        let name = field.name();
        if name.starts_with("log.") {
            return TextField::Skipped;
        }
        if self.started {
            self.line.push(' ');
        }
        self.started = true;
        if name == "message" {
            return TextField::Message;
        }
        self.line.push_str(name.strip_prefix("r#").unwrap_or(name));
        self.line.push('=');
        TextField::Named
    }

    fn push_debug(&mut self, value: &dyn fmt::Debug) {
        self.failed |= write!(self.line, "{value:?}").is_err();
    }
}

impl Visit for TextFieldsVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        match self.start(field) {
            TextField::Skipped => {}
            TextField::Message => push_message(self.line, self.sanitize, value),
            TextField::Named
                if !any_byte(value, |b| {
                    !matches!(b, b' '..=b'~') || b == b'"' || b == b'\\'
                }) =>
            {
                // What `Debug` writes for printable ASCII without quotes or
                // backslashes: the text, quoted.
                self.line.push('"');
                self.line.push_str(value);
                self.line.push('"');
            }
            TextField::Named => self.push_debug(&value),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match self.start(field) {
            TextField::Skipped => {}
            TextField::Message => {
                // Sanitized as it is written, with no string of its own.
                let mut message = Message {
                    line: self.line,
                    sanitize: self.sanitize,
                };
                self.failed |= write!(message, "{value:?}").is_err();
            }
            TextField::Named => self.push_debug(value),
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.start(field) != TextField::Skipped {
            let _ = write!(self.line, "{value}");
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.start(field) != TextField::Skipped {
            let _ = write!(self.line, "{value}");
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.start(field) != TextField::Skipped {
            self.line.push_str(if value { "true" } else { "false" });
        }
    }

    fn record_error(&mut self, _field: &Field, _value: &(dyn std::error::Error + 'static)) {
        self.unusual = true;
    }
}

/// Appends a message as it is given, sanitized when `sanitize` is set.
struct Message<'a> {
    line: &'a mut String,
    sanitize: bool,
}

impl fmt::Write for Message<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        push_message(self.line, self.sanitize, text);
        Ok(())
    }
}

fn push_message(line: &mut String, sanitize: bool, text: &str) {
    if sanitize {
        push_sanitized(line, text);
    } else {
        line.push_str(text);
    }
}

/// `text` as tracing-subscriber's ANSI sanitizing writes it: ESC, BEL, BS,
/// FF and DEL as `\x1b`-style escapes, C1 control characters as `\u{80}`.
fn push_sanitized(line: &mut String, text: &str) {
    // C1 characters are encoded 0xC2 0x80..=0x9F in UTF-8.
    if !any_byte(text, |b| {
        matches!(b, 0x1b | 0x07 | 0x08 | 0x0c | 0x7f | 0xc2)
    }) {
        line.push_str(text);
        return;
    }
    for ch in text.chars() {
        match ch {
            '\x1b' => line.push_str("\\x1b"),
            '\x07' => line.push_str("\\x07"),
            '\x08' => line.push_str("\\x08"),
            '\x0c' => line.push_str("\\x0c"),
            '\x7f' => line.push_str("\\x7f"),
            '\u{80}'..='\u{9f}' => {
                let _ = write!(line, "\\u{{{:x}}}", ch as u32);
            }
            _ => line.push(ch),
        }
    }
}

/// `text` as a JSON string, escaped as serde_json escapes: `"`, `\` and
/// control characters only (short forms where JSON has them, else
/// `\u00xx`); everything else as it is.
fn push_json_str(line: &mut String, text: &str) {
    line.push('"');
    push_json_escaped(line, text);
    line.push('"');
}

/// Appends what it is given as the inside of a JSON string.
struct JsonEscaping<'a>(&'a mut String);

impl fmt::Write for JsonEscaping<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        push_json_escaped(self.0, text);
        Ok(())
    }
}

/// `text` escaped for the inside of a JSON string (see [`push_json_str`]).
fn push_json_escaped(line: &mut String, text: &str) {
    if !any_byte(text, |b| b < 0x20 || b == b'"' || b == b'\\') {
        line.push_str(text);
        return;
    }
    let mut plain_from = 0;
    for (i, byte) in text.bytes().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        line.push_str(&text[plain_from..i]);
        if escape.is_empty() {
            let _ = write!(line, "\\u{byte:04x}");
        } else {
            line.push_str(escape);
        }
        plain_from = i + 1;
    }
    line.push_str(&text[plain_from..]);
}

/// Whether any byte of `text` is one `wanted` picks. In blocks of 16 with
/// no early exit inside a block, which the compiler turns into vector
/// compares: a log line's strings are checked this way before any escaping,
/// and nearly all of them need none.
#[inline]
fn any_byte(text: &str, wanted: impl Fn(u8) -> bool + Copy) -> bool {
    let mut blocks = text.as_bytes().chunks_exact(16);
    for block in &mut blocks {
        if block.iter().fold(false, |found, &b| found | wanted(b)) {
            return true;
        }
    }
    blocks.remainder().iter().any(|&b| wanted(b))
}

/// `time` as tracing-subscriber's `SystemTime` timer writes it, e.g.
/// `2026-11-30T21:19:12.800859Z` (UTC, microseconds). (chrono's conversion
/// holds for years within ±262,143: any clock this runs on.)
fn push_timestamp(line: &mut String, time: SystemTime) {
    use chrono::{Datelike, Timelike};
    let utc: chrono::DateTime<chrono::Utc> = time.into();
    let year = utc.year();
    if (0..=9999).contains(&year) {
        push_digits(line, year.unsigned_abs(), 4);
    } else if year > 9999 {
        let _ = write!(line, "+{year}");
    } else {
        let _ = write!(line, "{year:05}");
    }
    for (separator, value) in [
        ('-', utc.month()),
        ('-', utc.day()),
        ('T', utc.hour()),
        (':', utc.minute()),
        (':', utc.second()),
    ] {
        line.push(separator);
        push_digits(line, value, 2);
    }
    line.push('.');
    push_digits(line, utc.nanosecond() % 1_000_000_000 / 1_000, 6);
    line.push('Z');
}

/// `value` in decimal, zero-padded to `width` digits (`value` has at most
/// that many).
fn push_digits(line: &mut String, value: u32, width: u32) {
    let mut divisor = 10u32.pow(width - 1);
    while divisor > 0 {
        line.push(char::from(b'0' + (value / divisor % 10) as u8));
        divisor /= 10;
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    /// Every line written, shared with the test.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
        type Writer = Lines;
        fn make_writer(&'a self) -> Lines {
            self.clone()
        }
    }

    impl Lines {
        /// The text lines, each timestamp (`2026-11-30T21:19:12.800859Z`,
        /// coloured or not) taken out.
        fn without_text_timestamps(&self) -> Vec<String> {
            const SHAPE: &[u8; 27] = b"dddd-dd-ddTdd:dd:dd.ddddddZ";
            let is_stamp = |bytes: &[u8]| {
                bytes.len() >= SHAPE.len()
                    && SHAPE.iter().zip(bytes).all(|(shape, byte)| match shape {
                        b'd' => byte.is_ascii_digit(),
                        _ => shape == byte,
                    })
            };
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines()
                .map(|line| {
                    let mut kept = String::new();
                    let mut i = 0;
                    while i < line.len() {
                        if is_stamp(&line.as_bytes()[i..]) {
                            i += SHAPE.len();
                        } else {
                            let ch = line[i..].chars().next().unwrap();
                            kept.push(ch);
                            i += ch.len_utf8();
                        }
                    }
                    kept
                })
                .collect()
        }

        /// The JSON lines, each with its timestamp taken out.
        fn without_timestamps(&self) -> Vec<String> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines()
                .map(|line| {
                    let start = line.find("\"timestamp\":\"").expect(line) + 13;
                    let end = start + line[start..].find('"').unwrap();
                    format!("{}{}", &line[..start], &line[end..])
                })
                .collect()
        }
    }

    #[derive(Debug)]
    struct Failure;
    impl fmt::Display for Failure {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("it \"failed\"\n")
        }
    }
    impl std::error::Error for Failure {}

    /// An error with a source: the text format lists the chain.
    #[derive(Debug)]
    struct Wrapped(Failure);
    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// What the text format treats apart: control characters in messages
    /// (escaped when sanitizing), non-ASCII in `Debug` strings, errors with
    /// and without sources, every level's padding.
    fn text_events() {
        events();
        tracing::info!(
            "ansi \u{1b}[31mred\u{1b}[0m bell \u{7} bs \u{8} ff \u{c} del \u{7f} c1 \u{85}\u{9f} nbsp \u{a0} é"
        );
        tracing::info!(
            text = "é 🦀 e\u{301} \u{1b} \u{85} tab\t 'single'",
            plain = "printable ASCII, no quotes",
            empty = "",
            quoted = "say \"hi\"",
            slash = "C:\\dir",
            message = "message \u{1b} as a field"
        );
        tracing::warn!("formatted {} \u{1b}[1m {:?}", "args", "dbg\u{1b}");
        tracing::error!(
            error = &Wrapped(Failure) as &dyn std::error::Error,
            "with a source"
        );
        tracing::trace!(
            n = -9223372036854775808i64,
            m = u64::MAX,
            f = -0.0f64,
            "extremes"
        );
        tracing::debug!(bytes = tracing::field::display("shown"), "display value");
        // `log.*` fields are left out, as the stock visitor leaves them out.
        tracing::info!(log.line = 3u64, log.file = "f.rs", after = 1, "log fields");
        tracing::info!(message = 5);
        tracing::info!(message = true);
        tracing::info!(message = -1.5f64);
        tracing::info!(bytes = &b"\x00ab"[..], "bytes");
        // A `Debug` that fails: the layer writes its "Unable to format" line.
        tracing::info!(broken = ?Unformattable, "never written");
    }

    /// A `Debug` that fails.
    struct Unformattable;
    impl fmt::Debug for Unformattable {
        fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
            Err(fmt::Error)
        }
    }

    /// The same events, at every level and with every kind of field.
    fn events() {
        tracing::info!("plain message");
        tracing::warn!(
            request_id = %"8c91731e-c464-4e66-ad07-ff1882fee009",
            surface = "v2",
            status = 200u16,
            upstream_status = 0u64,
            delta = -3i64,
            latency_ms = 105.519518f64,
            ok = true,
            "request"
        );
        tracing::error!(
            text = "quote \" backslash \\ newline \n tab \t cr \r bell \u{7} nul \0 bs \u{8} ff \u{c} vt \u{b} esc \u{1b} us \u{1f} del \u{7f} é 🦀",
            debug = ?("tuple", 1, "x\"y"),
            big = 1e21f64,
            tiny = 1.5e-7f64,
            nan = f64::NAN,
            infinite = f64::INFINITY,
            wide = 170141183460469231731687303715884105727i128,
            error = &Failure as &dyn std::error::Error,
            r#type = "raw",
            "with \"quotes\" {}", 42
        );
        tracing::info!(
            neg_zero = -0.0f64,
            sum = 0.1f64 + 0.2,
            max = f64::MAX,
            min = f64::MIN_POSITIVE,
            subnormal = 5e-324f64,
            whole = 3.0f64,
            "floats"
        );
        tracing::debug!(dotted.name = 1, "we\"ird\\name" = 2, "debug");
        tracing::info!(target: "odd \"target\"", "custom target");
        // A `log` record: the stock format reads its level and target.
        tracing_log::format_trace(
            &log::Record::builder()
                .level(log::Level::Warn)
                .target("a_log_crate")
                .args(format_args!("from log"))
                .build(),
        )
        .unwrap();
        tracing::trace!("trace");
        let span = tracing::info_span!("in_span", id = 7);
        span.in_scope(|| tracing::info!(inner = "yes", "inside a span"));
        tracing::info!(parent: &span, "explicit parent");
    }

    #[test]
    fn lines_are_the_stock_json_format_s() {
        let stock = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_max_level(tracing::Level::TRACE)
            .with_writer(stock.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, events);

        let fast = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .event_format(FastJson::new())
            .with_max_level(tracing::Level::TRACE)
            .with_writer(fast.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, events);

        let (stock, fast) = (stock.without_timestamps(), fast.without_timestamps());
        assert_eq!(stock.len(), 10, "{stock:#?}");
        assert_eq!(fast, stock);
        assert!(
            stock
                .iter()
                .any(|l| l.contains(r#""target":"a_log_crate""#)),
            "{stock:#?}"
        );
    }

    /// The lines of `text_events` as the stock text format and as
    /// [`FastText`] write them, colours on or off, ANSI escapes in messages
    /// sanitized or not.
    fn text_lines(ansi: bool, sanitize: bool) -> (Vec<String>, Vec<String>) {
        let stock = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(ansi)
            .with_ansi_sanitization(sanitize)
            .with_max_level(tracing::Level::TRACE)
            .with_writer(stock.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, text_events);

        let fast = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(ansi)
            .with_ansi_sanitization(sanitize)
            .event_format(FastText::new())
            .with_max_level(tracing::Level::TRACE)
            .with_writer(fast.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, text_events);
        (
            stock.without_text_timestamps(),
            fast.without_text_timestamps(),
        )
    }

    #[test]
    fn lines_are_the_stock_text_format_s() {
        let (stock, fast) = text_lines(false, true);
        // 22 events; the errors' raw newlines break two lines in two.
        assert_eq!(stock.len(), 24, "{stock:#?}");
        assert_eq!(fast, stock);
        // The cases are there: escapes, a log record, a source chain.
        for expected in [
            r"ansi \x1b[31mred\x1b[0m bell \x07 bs \x08 ff \x0c del \x7f c1 \u{85}\u{9f}",
            " WARN a_log_crate: from log",
            "error.sources=[it \"failed\"",
            "TRACE toastgate::logs::tests: extremes n=-9223372036854775808",
            " INFO toastgate::logs::tests: log fields after=1",
            "Unable to format the following event. Name: event src/logs.rs:",
        ] {
            assert!(
                stock.iter().any(|l| l.contains(expected)),
                "{expected}: {stock:#?}"
            );
        }
    }

    #[test]
    fn unsanitized_lines_are_the_stock_text_format_s() {
        let (stock, fast) = text_lines(false, false);
        assert!(
            stock.iter().any(|l| l.contains("ansi \u{1b}[31mred")),
            "{stock:#?}"
        );
        assert_eq!(fast, stock);
    }

    #[test]
    fn coloured_lines_are_the_stock_text_format_s() {
        let (stock, fast) = text_lines(true, true);
        assert!(stock.iter().any(|l| l.contains("\u{1b}[")), "{stock:#?}");
        assert_eq!(fast, stock);
    }

    /// The wanted byte at every position of strings across block bounds.
    #[test]
    fn any_byte_finds_a_wanted_byte_wherever_it_is() {
        for len in 0..50 {
            let plain = "a".repeat(len);
            assert!(!any_byte(&plain, |b| b == b'"'), "{len}");
            for at in 0..len {
                let mut text = plain.clone().into_bytes();
                text[at] = b'"';
                let text = String::from_utf8(text).unwrap();
                assert!(any_byte(&text, |b| b == b'"'), "{len} {at}");
            }
        }
    }

    #[test]
    fn timestamps_are_written_as_the_stock_timer_writes_them() {
        let day = |seconds: u64, nanos: u32| UNIX_EPOCH + Duration::new(seconds, nanos);
        for time in [
            day(0, 0),
            day(1_796_073_552, 800_859_123),
            day(951_782_400, 999_999_999), // 2000-02-29
            day(253_402_300_799, 1_000),   // 9999-12-31T23:59:59
            day(253_402_300_800, 0),       // year 10000: "+10000"
            UNIX_EPOCH - Duration::from_secs(62_200_000_000), // year -2: "-0002"
        ] {
            let mut line = String::new();
            push_timestamp(&mut line, time);
            let reference = chrono::DateTime::<chrono::Utc>::from(time)
                .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                .to_string();
            assert_eq!(line, reference);
        }
    }
}
