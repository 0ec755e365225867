//! Splits the control socket's byte stream into top-level JSON values, the way QEMU's streaming
//! JSON lexer does (qobject/json-lexer.c, json-streamer.c): it tracks string and escape state
//! and `{}`/`[]` nesting, skips whitespace between values, and hands up each complete value's
//! bytes, whatever its type (`{...}`, `[1]`, `1`, `"x"`: rejecting a non-object is the command
//! layer's job, with QMP's own error).
//!
//! It owns the stream's limits ([`MAX_MESSAGE_BYTES`], [`MAX_NESTING`]) and its recovery: after
//! an error it yields one [`FrameError`] and discards input through the next newline, so the
//! connection survives and the next line is read afresh. (QEMU also resynchronises on
//! structural characters; a line is the unit every QMP client writes, and resuming mid-line
//! inside an oversized or broken value would turn one error into a cascade of them.)
//!
//! It does not know JSON's grammar beyond that (`serde_json` parses each value and reports
//! syntax errors, invalid UTF-8 included), nor QMP, sockets, fds or threads.

use std::fmt;

/// Largest value, in bytes, the splitter buffers. QMP commands are tiny (the largest vublk
/// takes, `blockdev-change-medium` with a backing chain, is well under a kilobyte); a client
/// that sends more is broken or hostile, and the daemon must not buffer it without bound.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Deepest `{`/`[` nesting accepted. QEMU's json-streamer allows 1024, but `serde_json` refuses
/// anything deeper than 128 anyway, and vublk's deepest command nests 4 levels
/// (`arguments.backing[i]`) plus whatever a client puts in `id`: 64 leaves room for that and
/// bounds the recursion of everything that later walks the parsed value.
pub const MAX_NESTING: usize = 64;

/// Why a stretch of input was not a JSON value. The `Display` text is the `desc` of the QMP
/// error reply, worded like QEMU's where QEMU has one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A value grew past [`MAX_MESSAGE_BYTES`] before it ended.
    #[error("JSON token size limit exceeded: a message is at most {limit} bytes")]
    TooLarge { limit: usize },
    /// Brackets nested deeper than [`MAX_NESTING`].
    #[error("JSON nesting depth limit exceeded: at most {limit} levels")]
    TooDeep { limit: usize },
    /// A byte that cannot start a value between values (a stray `}` or `]` included).
    #[error("JSON parse error, stray '{}'", ByteLiteral(*byte))]
    Stray { byte: u8 },
    /// A closing bracket that does not match the innermost open one.
    #[error("JSON parse error, '{}' does not close '{}'", ByteLiteral(*close), ByteLiteral(*open))]
    Mismatched { open: u8, close: u8 },
    /// An unescaped control character (a line break, typically) inside a string, which JSON
    /// forbids (RFC 8259 section 7); QEMU's lexer rejects it too.
    #[error("JSON parse error, control character '{}' in a string", ByteLiteral(*byte))]
    ControlInString { byte: u8 },
}

/// A byte as it appears in an error: printable ASCII as itself, anything else as `\xNN`.
struct ByteLiteral(u8);

impl fmt::Display for ByteLiteral {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "{}", char::from(self.0))
        } else {
            write!(f, "\\x{:02x}", self.0)
        }
    }
}

/// Where the scanner is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between top-level values: whitespace is skipped, anything else starts a value.
    Between,
    /// Inside `{...}`/`[...]`, outside any string.
    Container,
    /// Inside a string opened by `quote` (`"`, or `'`: QEMU's lexer accepts single-quoted
    /// strings, so they are framed the same way even though serde_json then rejects them);
    /// `escaped` after a backslash.
    String { quote: u8, escaped: bool },
    /// A top-level number or keyword (`1`, `true`, `foo`): it ends at the first byte that
    /// cannot continue it, which is not consumed.
    Scalar,
    /// After an error: discarding input through the next newline.
    Skipping,
}

/// Accumulates stream bytes and yields complete top-level JSON values (as [`Iterator`] items).
///
/// Call [`push`](Self::push) with what the socket delivered, then drain the iterator until it
/// returns `None`; it returns `Some` again after the next push. Memory is bounded by one value
/// ([`MAX_MESSAGE_BYTES`]) plus the bytes pushed and not yet drained.
#[derive(Debug)]
pub struct JsonSplitter {
    /// Input not yet handed up or discarded, from `start`; bytes before `start` are consumed
    /// and dropped on the next push.
    buf: Vec<u8>,
    /// Offset in `buf` of the value being scanned (or of the next byte, between values).
    start: usize,
    /// Offset in `buf` of the next byte to scan.
    pos: usize,
    state: State,
    /// The closing bracket each open container expects, innermost last; at most
    /// [`MAX_NESTING`] long.
    open: Vec<u8>,
}

impl Default for JsonSplitter {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonSplitter {
    /// A splitter at the start of a stream.
    pub fn new() -> Self {
        JsonSplitter {
            buf: Vec::new(),
            start: 0,
            pos: 0,
            state: State::Between,
            open: Vec::new(),
        }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.pos -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Hands up the value `buf[start..pos]`.
    fn emit(&mut self) -> Vec<u8> {
        let value = self.buf[self.start..self.pos].to_vec();
        self.start = self.pos;
        self.state = State::Between;
        value
    }

    /// Drops the value in progress and resynchronises: at once if the byte that caused the
    /// error (already consumed) was a newline, else after the next one.
    fn fail(&mut self, error: FrameError, last: u8) -> FrameError {
        self.start = self.pos;
        self.open.clear();
        self.state = if last == b'\n' {
            State::Between
        } else {
            State::Skipping
        };
        error
    }

    /// Scans one byte in `Container` state; `Some` ends the value (complete or failed).
    fn scan_container(&mut self, byte: u8) -> Option<Result<Vec<u8>, FrameError>> {
        match byte {
            b'{' | b'[' => {
                if self.open.len() >= MAX_NESTING {
                    let error = FrameError::TooDeep { limit: MAX_NESTING };
                    return Some(Err(self.fail(error, byte)));
                }
                self.open.push(closer(byte));
            }
            b'}' | b']' => {
                // Container state implies an open bracket; an empty stack would be a stray.
                let expected = self.open.pop().unwrap_or(byte);
                if expected != byte {
                    let error = FrameError::Mismatched {
                        open: opener(expected),
                        close: byte,
                    };
                    return Some(Err(self.fail(error, byte)));
                }
                if self.open.is_empty() {
                    return Some(Ok(self.emit()));
                }
            }
            b'"' | b'\'' => {
                self.state = State::String {
                    quote: byte,
                    escaped: false,
                }
            }
            _ => {}
        }
        None
    }
}

/// The bracket that closes `open`.
fn closer(open: u8) -> u8 {
    if open == b'{' {
        b'}'
    } else {
        b']'
    }
}

/// The bracket that `close` closes.
fn opener(close: u8) -> u8 {
    if close == b'}' {
        b'{'
    } else {
        b'['
    }
}

/// Bytes that may begin a top-level number or keyword (JSON's plus QEMU's looser keyword set;
/// serde_json judges the token).
fn starts_scalar(byte: u8) -> bool {
    byte == b'-' || byte.is_ascii_alphanumeric()
}

/// Bytes that may continue a number or keyword (`-1.5e+3`, `true`, `foo`).
fn continues_scalar(byte: u8) -> bool {
    matches!(byte, b'-' | b'+' | b'.') || byte.is_ascii_alphanumeric()
}

impl Iterator for JsonSplitter {
    type Item = Result<Vec<u8>, FrameError>;

    /// The next complete value or error, or `None` when the buffered input holds neither yet.
    fn next(&mut self) -> Option<Self::Item> {
        while let Some(&byte) = self.buf.get(self.pos) {
            if self.state == State::Scalar && !continues_scalar(byte) {
                return Some(Ok(self.emit()));
            }
            self.pos += 1;
            match self.state {
                State::Skipping => {
                    self.start = self.pos;
                    if byte == b'\n' {
                        self.state = State::Between;
                    }
                    continue;
                }
                State::Between => match byte {
                    b' ' | b'\t' | b'\r' | b'\n' => self.start = self.pos,
                    b'{' | b'[' => {
                        self.open.push(closer(byte));
                        self.state = State::Container;
                    }
                    b'"' | b'\'' => {
                        self.state = State::String {
                            quote: byte,
                            escaped: false,
                        }
                    }
                    _ if starts_scalar(byte) => self.state = State::Scalar,
                    _ => return Some(Err(self.fail(FrameError::Stray { byte }, byte))),
                },
                State::Container => {
                    if let Some(item) = self.scan_container(byte) {
                        return Some(item);
                    }
                }
                State::String { quote, escaped } => {
                    if escaped {
                        self.state = State::String {
                            quote,
                            escaped: false,
                        };
                    } else if byte == b'\\' {
                        self.state = State::String {
                            quote,
                            escaped: true,
                        };
                    } else if byte == quote {
                        if self.open.is_empty() {
                            return Some(Ok(self.emit()));
                        }
                        self.state = State::Container;
                    } else if byte < 0x20 {
                        let error = FrameError::ControlInString { byte };
                        return Some(Err(self.fail(error, byte)));
                    }
                }
                State::Scalar => {}
            }
            if self.pos - self.start > MAX_MESSAGE_BYTES {
                let error = FrameError::TooLarge {
                    limit: MAX_MESSAGE_BYTES,
                };
                return Some(Err(self.fail(error, byte)));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything the splitter yields for `input` pushed at once.
    fn split(input: &[u8]) -> Vec<Result<Vec<u8>, FrameError>> {
        let mut splitter = JsonSplitter::new();
        splitter.push(input);
        splitter.collect()
    }

    fn ok(value: &str) -> Result<Vec<u8>, FrameError> {
        Ok(value.as_bytes().to_vec())
    }

    #[test]
    fn several_values_in_one_push_come_out_in_order() {
        let got = split(b"{\"execute\":\"a\"}\r\n{\"execute\":\"b\"} [1]{}\n");

        assert_eq!(
            got,
            vec![
                ok("{\"execute\":\"a\"}"),
                ok("{\"execute\":\"b\"}"),
                ok("[1]"),
                ok("{}")
            ]
        );
    }

    #[test]
    fn a_value_pushed_byte_by_byte_comes_out_once_complete() {
        let input = b"  {\"execute\": \"query-block\", \"id\": [1, {\"a\": \"}\"}]}\n";
        let mut splitter = JsonSplitter::new();
        let mut got = Vec::new();

        for byte in input {
            splitter.push(std::slice::from_ref(byte));
            got.extend(&mut splitter);
        }

        assert_eq!(
            got,
            vec![ok(
                "{\"execute\": \"query-block\", \"id\": [1, {\"a\": \"}\"}]}"
            )]
        );
    }

    #[test]
    fn brackets_and_escaped_quotes_inside_strings_do_not_count() {
        let value = r#"{"a": "}]{[", "b": "say \"}\" \\", "c": 'x"}'}"#;

        let got = split(format!("{value}\n").as_bytes());

        assert_eq!(got, vec![ok(value)]);
    }

    #[test]
    fn top_level_scalars_and_strings_are_complete_values() {
        let got = split(b"1 \"x\" true -2.5e+3\nnull[2]foo\n");

        assert_eq!(
            got,
            vec![
                ok("1"),
                ok("\"x\""),
                ok("true"),
                ok("-2.5e+3"),
                ok("null"),
                ok("[2]"),
                ok("foo")
            ]
        );
    }

    #[test]
    fn a_top_level_scalar_waits_for_the_byte_that_ends_it() {
        let mut splitter = JsonSplitter::new();
        splitter.push(b"12");
        let before = splitter.next();

        splitter.push(b"3\n");

        assert_eq!((before, splitter.next()), (None, Some(ok("123"))));
    }

    #[test]
    fn nesting_at_the_limit_is_accepted() {
        let value = format!("{}{}", "[".repeat(MAX_NESTING), "]".repeat(MAX_NESTING));

        let got = split(format!("{value}\n").as_bytes());

        assert_eq!(got, vec![ok(&value)]);
    }

    #[test]
    fn nesting_past_the_limit_fails_and_the_next_line_is_read() {
        let deep = format!(
            "{}{}",
            "[".repeat(MAX_NESTING + 1),
            "]".repeat(MAX_NESTING + 1)
        );

        let got = split(format!("{deep}\n{{\"execute\":\"quit\"}}\n").as_bytes());

        assert_eq!(
            got,
            vec![
                Err(FrameError::TooDeep { limit: MAX_NESTING }),
                ok("{\"execute\":\"quit\"}")
            ]
        );
    }

    #[test]
    fn an_oversized_value_fails_once_and_the_next_line_is_read() {
        let big = format!("{{\"execute\":\"{}\"}}", "x".repeat(MAX_MESSAGE_BYTES));
        let mut splitter = JsonSplitter::new();

        splitter.push(big.as_bytes());
        let first: Vec<_> = (&mut splitter).collect();
        splitter.push(b"\n{\"execute\":\"quit\"}\n");
        let second: Vec<_> = (&mut splitter).collect();

        assert_eq!(
            first,
            vec![Err(FrameError::TooLarge {
                limit: MAX_MESSAGE_BYTES
            })]
        );
        assert_eq!(second, vec![ok("{\"execute\":\"quit\"}")]);
    }

    #[test]
    fn skipped_input_is_not_kept_in_memory() {
        let mut splitter = JsonSplitter::new();
        splitter.push(b"@");
        let _ = splitter.next();

        splitter.push(&vec![b'x'; 4096]);
        let _ = splitter.next();
        splitter.push(b"");

        assert!(splitter.buf.is_empty());
    }

    #[test]
    fn a_value_exactly_at_the_size_limit_is_accepted() {
        let value = format!("\"{}\"", "x".repeat(MAX_MESSAGE_BYTES - 2));

        let got = split(format!("{value}\n").as_bytes());

        assert_eq!(got, vec![Ok(value.into_bytes())]);
    }

    #[test]
    fn garbage_then_a_valid_command_on_the_next_line_survives() {
        let got = split(b"@#!{\"execute\":\"a\"}\n{\"execute\":\"qmp_capabilities\"}\n");

        assert_eq!(
            got,
            vec![
                Err(FrameError::Stray { byte: b'@' }),
                ok("{\"execute\":\"qmp_capabilities\"}")
            ]
        );
    }

    #[test]
    fn a_stray_closing_bracket_is_an_error() {
        let got = split(b"}\n]\n{}\n");

        assert_eq!(
            got,
            vec![
                Err(FrameError::Stray { byte: b'}' }),
                Err(FrameError::Stray { byte: b']' }),
                ok("{}")
            ]
        );
    }

    #[test]
    fn a_mismatched_closing_bracket_is_an_error() {
        let got = split(b"{\"a\": [}\n{}\n");

        assert_eq!(
            got,
            vec![
                Err(FrameError::Mismatched {
                    open: b'[',
                    close: b'}'
                }),
                ok("{}")
            ]
        );
    }

    #[test]
    fn an_unterminated_string_ends_at_the_line_break() {
        let got = split(b"{\"execute\": \"quit\n{\"execute\":\"quit\"}\n");

        assert_eq!(
            got,
            vec![
                Err(FrameError::ControlInString { byte: b'\n' }),
                ok("{\"execute\":\"quit\"}")
            ]
        );
    }

    #[test]
    fn whitespace_alone_yields_nothing() {
        let got = split(b" \r\n\t \n");

        assert_eq!(got, vec![]);
    }

    #[test]
    fn invalid_utf8_inside_a_string_is_left_to_the_parser() {
        let got = split(b"{\"a\": \"\xff\xfe\"}\n");

        assert_eq!(got, vec![Ok(b"{\"a\": \"\xff\xfe\"}".to_vec())]);
    }

    #[test]
    fn errors_read_like_qemu_and_name_the_byte() {
        let texts = [
            FrameError::Stray { byte: b'@' }.to_string(),
            FrameError::Stray { byte: 0xff }.to_string(),
            FrameError::TooDeep { limit: 64 }.to_string(),
        ];

        assert_eq!(
            texts,
            [
                "JSON parse error, stray '@'",
                "JSON parse error, stray '\\xff'",
                "JSON nesting depth limit exceeded: at most 64 levels",
            ]
        );
    }
}
