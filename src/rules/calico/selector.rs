//! Calico selector expressions: parsing, printing, and what they select on a pod's OS label.
//!
//! The grammar and tokenisation follow Calico's own parser (libcalico-go
//! `lib/selector/parser/parser.go` and `lib/selector/tokenizer/tokenizer.go`): `||` binds
//! loosest, then `&&`, then prefix `!` (a run of `!` collapses to one or none); whitespace
//! between tokens is spaces and tabs only, but inside `has( )`, `all( )`, `global( )` and
//! between the words of `not in`, `starts with` and `ends with` it is the regex `\s`
//! (`[\t\n\f\r ]`); a label key is at most 512 bytes of `[a-zA-Z0-9_./-]` (a longer run is
//! read as two tokens, as Calico does); strings are single- or double-quoted with no escapes;
//! operator words (`in`, `not in`, `contains`, `starts with`, `ends with`) are only recognised
//! right after a label key; an empty selector means `all()`.
//!
//! The conformance suite (`conformance/`) compares this parser with Calico's on Calico's own
//! test vectors and generated selectors. The one deliberate difference is [`MAX_DEPTH`].

use std::fmt;
use std::str::FromStr;

use crate::admission::objects::LabelSelector;

/// How deeply parentheses may nest before parsing stops with [`ParseError::TooDeep`].
///
/// Parsing and every analysis recurse once per nesting level; the limit keeps hostile input
/// from overflowing the stack. Real selectors nest a handful of levels. Calico has no such
/// limit: this is arcguard being stricter on purpose.
///
/// The limit applies to what a user writes. The Linux scoping rewrite,
/// `(<selector>) && <key> != 'windows'` (or the legacy `... == 'linux'`), adds a level; a
/// selector of exactly that shape may nest one level deeper, so a selector at the limit stays
/// valid once scoped. The parser cannot tell the OS label key, so a selector written in that
/// shape with another key (`(<100 levels>) && other != 'windows'`) gets the extra level too,
/// and its own rewrite is then one level too deep (denied, never admitted unscoped).
pub const MAX_DEPTH: usize = 100;

/// Longest label key Calico's tokenizer reads as one token (`LabelKeyMatcher`,
/// `[a-zA-Z0-9_./-]{1,512}`, in libcalico-go's `selector/tokenizer/tokenizer.go`).
const MAX_KEY_LEN: usize = 512;

/// What a selector says about one label's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Comparison {
    /// `k == 'v'`: the label is present with value `v`.
    Eq,
    /// `k != 'v'`: the label is absent or has another value.
    Ne,
    /// `k contains 'v'`: the label is present and its value contains `v`.
    Contains,
    /// `k starts with 'v'`: the label is present and its value starts with `v`.
    StartsWith,
    /// `k ends with 'v'`: the label is present and its value ends with `v`.
    EndsWith,
}

impl Comparison {
    /// The operator as written in a selector.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eq => "==",
            Self::Ne => "!=",
            Self::Contains => "contains",
            Self::StartsWith => "starts with",
            Self::EndsWith => "ends with",
        }
    }

    /// Whether a present label with value `actual` satisfies the comparison with `value`.
    fn holds(self, actual: &str, value: &str) -> bool {
        match self {
            Self::Eq => actual == value,
            Self::Ne => actual != value,
            Self::Contains => actual.contains(value),
            Self::StartsWith => actual.starts_with(value),
            Self::EndsWith => actual.ends_with(value),
        }
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed Calico selector.
///
/// The parser produces `And` and `Or` with at least two operands, and never `Not(Not(_))`
/// from a bare `!!` (Calico collapses that); printing such a tree parses back to the same tree.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Expr {
    /// `all()`: every endpoint.
    All,
    /// `global()`: as a subject selector, every endpoint (Calico evaluates it as true; it only
    /// narrows in namespace selectors).
    Global,
    /// `has(k)`: the label is present.
    Has(String),
    /// `k <op> 'v'`.
    Compare {
        /// The label key.
        key: String,
        /// The operator.
        op: Comparison,
        /// The string compared with.
        value: String,
    },
    /// `k in {'a', 'b'}`: the label is present with one of the values.
    In {
        /// The label key.
        key: String,
        /// The values, as written.
        values: Vec<String>,
    },
    /// `k not in {'a', 'b'}`: the label is absent or has none of the values.
    NotIn {
        /// The label key.
        key: String,
        /// The values, as written.
        values: Vec<String>,
    },
    /// `!e`.
    Not(Box<Expr>),
    /// `a && b && ...`; empty means `all()`.
    And(Vec<Expr>),
    /// `a || b || ...`; empty matches nothing.
    Or(Vec<Expr>),
}

/// Why a string is not a Calico selector; `column` counts characters from 1.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A quote opens a string that is never closed (Calico strings have no escapes).
    #[error("unterminated string starting at column {column}")]
    UnterminatedString {
        /// Column of the opening quote.
        column: usize,
    },
    /// A character that cannot start a token here.
    #[error("unexpected character {found:?} at column {column}: expected {expected}")]
    UnexpectedCharacter {
        /// Column of the character.
        column: usize,
        /// The character.
        found: char,
        /// What would have been valid.
        expected: &'static str,
    },
    /// A token that does not fit the grammar here.
    #[error("expected {expected} at column {column}, found {found}")]
    UnexpectedToken {
        /// Column of the token.
        column: usize,
        /// The token as the user would recognise it.
        found: String,
        /// What would have been valid.
        expected: &'static str,
    },
    /// Parentheses nest deeper than [`MAX_DEPTH`].
    #[error("parentheses nest deeper than {MAX_DEPTH} levels at column {column}")]
    TooDeep {
        /// Column of the first parenthesis beyond the limit.
        column: usize,
    },
}

/// Parses a Calico selector; empty (or blank) means `all()`.
///
/// # Errors
/// [`ParseError`] saying where and what, for anything Calico would reject.
pub fn parse(input: &str) -> Result<Expr, ParseError> {
    let tokens = tokenize(input)?;
    let mut parser = Parser { input, tokens, pos: 0, beyond: None };
    if parser.peek().tok == Tok::Eof {
        return Ok(Expr::All);
    }
    let expr = parser.parse_or(0)?;
    let next = parser.peek();
    if next.tok != Tok::Eof {
        return Err(parser.unexpected(next, "`&&`, `||` or the end of the selector"));
    }
    // One level beyond the limit is only for the scoping rewrite's own parentheses.
    if let Some(offset) = parser.beyond
        && !is_scoped_shape(&parser.tokens, &expr)
    {
        return Err(ParseError::TooDeep { column: column(input, offset) });
    }
    Ok(expr)
}

/// Whether `expr`, parsed from `tokens`, is what the Linux scoping rewrite writes:
/// `(<selector>) && <label> != 'windows'` or `(<selector>) && <label> == 'linux'`, the
/// parentheses opening first and closing right before the one top-level `&&`.
fn is_scoped_shape(tokens: &[Token<'_>], expr: &Expr) -> bool {
    let Expr::And(terms) = expr else { return false };
    let [_, clause] = terms.as_slice() else { return false };
    let is_clause = matches!(clause, Expr::Compare { op: Comparison::Ne, value, .. } if value == WINDOWS)
        || matches!(clause, Expr::Compare { op: Comparison::Eq, value, .. } if value == LINUX);
    // `(` ... `)` `&&` label operator string end.
    let n = tokens.len();
    if !is_clause || n < 7 || tokens[0].tok != Tok::LParen || tokens[n - 5].tok != Tok::And {
        return false;
    }
    let mut depth = 0usize;
    for (i, token) in tokens.iter().enumerate() {
        match token.tok {
            Tok::LParen => depth += 1,
            Tok::RParen => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return i == n - 6;
                }
            }
            _ => {}
        }
    }
    false
}

impl FromStr for Expr {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

// === tokenizer ===

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tok<'a> {
    Label(&'a str),
    Str(&'a str),
    Has(&'a str),
    All,
    Global,
    LParen,
    RParen,
    LBrace,
    RBrace,
    Comma,
    Eq,
    Ne,
    Not,
    And,
    Or,
    In,
    NotIn,
    Contains,
    StartsWith,
    EndsWith,
    Eof,
}

#[derive(Clone, Copy, Debug)]
struct Token<'a> {
    tok: Tok<'a>,
    /// Byte offset in the input.
    offset: usize,
}

const EXPECTED_OPERAND: &str = "a label, `!`, `(`, `has(<label>)`, `all()` or `global()`";
const EXPECTED_OPERATOR: &str = "an operator after the label (`==`, `!=`, `in`, `not in`, `contains`, `starts with`, `ends with`)";

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-')
}

fn column(input: &str, offset: usize) -> usize {
    input.get(..offset).map_or(offset, |s| s.chars().count()) + 1
}

/// The offset after the spaces and tabs at `offset`: the blanks Calico skips between tokens.
fn skip_blank(input: &str, mut offset: usize) -> usize {
    let bytes = input.as_bytes();
    while matches!(bytes.get(offset), Some(b' ' | b'\t')) {
        offset += 1;
    }
    offset
}

/// The offset after the `\s` characters (`[\t\n\f\r ]`, Go's RE2) at `offset`: the blanks
/// Calico's regexes allow inside `has( )`, `all( )`, `global( )` and between operator words.
fn skip_space(input: &str, mut offset: usize) -> usize {
    let bytes = input.as_bytes();
    while matches!(bytes.get(offset), Some(b' ' | b'\t' | b'\n' | b'\x0c' | b'\r')) {
        offset += 1;
    }
    offset
}

/// The end of the label key at `offset`: at most [`MAX_KEY_LEN`] key bytes.
fn key_end(input: &str, offset: usize) -> usize {
    let bytes = input.as_bytes();
    let mut end = offset;
    while end - offset < MAX_KEY_LEN && bytes.get(end).copied().is_some_and(is_key_byte) {
        end += 1;
    }
    end
}

fn tokenize(input: &str) -> Result<Vec<Token<'_>>, ParseError> {
    let bytes = input.as_bytes();
    let rest = |offset: usize| input.get(offset..).unwrap_or_default();
    let unexpected = |offset: usize, expected: &'static str| ParseError::UnexpectedCharacter {
        column: column(input, offset),
        found: rest(offset).chars().next().unwrap_or(' '),
        expected,
    };
    let mut tokens: Vec<Token<'_>> = Vec::new();
    let mut offset = 0;
    loop {
        offset = skip_blank(input, offset);
        let start = offset;
        let Some(&byte) = bytes.get(offset) else {
            tokens.push(Token { tok: Tok::Eof, offset });
            return Ok(tokens);
        };
        let after_label = matches!(tokens.last(), Some(Token { tok: Tok::Label(_), .. }));
        let next = bytes.get(offset + 1).copied();
        let (tok, len) = match byte {
            b'(' => (Tok::LParen, 1),
            b')' => (Tok::RParen, 1),
            b'{' => (Tok::LBrace, 1),
            b'}' => (Tok::RBrace, 1),
            b',' => (Tok::Comma, 1),
            b'"' | b'\'' => {
                let quote = char::from(byte);
                let body = rest(offset + 1);
                let Some(end) = body.find(quote) else {
                    return Err(ParseError::UnterminatedString { column: column(input, offset) });
                };
                (Tok::Str(&body[..end]), end + 2)
            }
            b'=' if next == Some(b'=') => (Tok::Eq, 2),
            b'=' => return Err(unexpected(offset, "`==`")),
            b'!' if next == Some(b'=') => (Tok::Ne, 2),
            b'!' => (Tok::Not, 1),
            b'&' if next == Some(b'&') => (Tok::And, 2),
            b'&' => return Err(unexpected(offset, "`&&`")),
            b'|' if next == Some(b'|') => (Tok::Or, 2),
            b'|' => return Err(unexpected(offset, "`||`")),
            _ if after_label => {
                operator_word(input, offset).ok_or_else(|| ParseError::UnexpectedToken {
                    column: column(input, offset),
                    found: describe_word(input, offset),
                    expected: EXPECTED_OPERATOR,
                })?
            }
            _ => {
                let text = rest(offset);
                if let Some(call) =
                    ["has(", "all(", "global("].into_iter().find(|p| text.starts_with(p))
                {
                    let inner = skip_space(input, offset + call.len());
                    let (tok, close) = if call == "has(" {
                        let end = key_end(input, inner);
                        if end == inner {
                            return Err(unexpected_at(input, inner, "a label inside `has(`"));
                        }
                        (Tok::Has(&input[inner..end]), skip_space(input, end))
                    } else if call == "all(" {
                        (Tok::All, inner)
                    } else {
                        (Tok::Global, inner)
                    };
                    if bytes.get(close) != Some(&b')') {
                        return Err(unexpected_at(input, close, "`)`"));
                    }
                    (tok, close + 1 - offset)
                } else {
                    let end = key_end(input, offset);
                    if end == offset {
                        return Err(unexpected(offset, EXPECTED_OPERAND));
                    }
                    (Tok::Label(&input[offset..end]), end - offset)
                }
            }
        };
        tokens.push(Token { tok, offset: start });
        offset += len;
    }
}

/// An error at `offset`: the character there, or the end of the selector.
fn unexpected_at(input: &str, offset: usize, expected: &'static str) -> ParseError {
    match input.get(offset..).and_then(|s| s.chars().next()) {
        Some(found) => {
            ParseError::UnexpectedCharacter { column: column(input, offset), found, expected }
        }
        None => ParseError::UnexpectedToken {
            column: column(input, offset),
            found: "the end of the selector".to_owned(),
            expected,
        },
    }
}

/// The operator word at `offset` (right after a label) and its length, as Calico's regexes
/// match it, in its order: `^contains`, `^starts\s*with`, `^ends\s*with`, `^not\s*in\b`,
/// `^in\b`.
fn operator_word(input: &str, offset: usize) -> Option<(Tok<'static>, usize)> {
    let text = input.get(offset..)?;
    // `\b` after `in`: the end, or a byte that is not `[0-9A-Za-z_]`.
    let boundary = |end: usize| {
        input.as_bytes().get(end).is_none_or(|&b| !(b.is_ascii_alphanumeric() || b == b'_'))
    };
    let two_words = |first: &str, second: &str, tok, bounded: bool| {
        let after = skip_space(input, offset + first.len());
        let end = after + second.len();
        (input.get(after..)?.starts_with(second) && (!bounded || boundary(end)))
            .then_some((tok, end - offset))
    };
    if text.starts_with("contains") {
        Some((Tok::Contains, "contains".len()))
    } else if let Some(found) = text
        .starts_with("starts")
        .then(|| two_words("starts", "with", Tok::StartsWith, false))
        .flatten()
    {
        Some(found)
    } else if let Some(found) =
        text.starts_with("ends").then(|| two_words("ends", "with", Tok::EndsWith, false)).flatten()
    {
        Some(found)
    } else if let Some(found) =
        text.starts_with("not").then(|| two_words("not", "in", Tok::NotIn, true)).flatten()
    {
        Some(found)
    } else if text.starts_with("in") && boundary(offset + 2) {
        Some((Tok::In, "in".len()))
    } else {
        None
    }
}

/// The word (or character) at `offset`, quoted for a message.
fn describe_word(input: &str, offset: usize) -> String {
    let end = key_end(input, offset);
    match input.get(offset..end).filter(|w| !w.is_empty()) {
        Some(word) => format!("`{word}`"),
        None => input
            .get(offset..)
            .and_then(|s| s.chars().next())
            .map_or_else(|| "the end of the selector".to_owned(), |c| format!("{c:?}")),
    }
}

// === parser ===

struct Parser<'a> {
    input: &'a str,
    tokens: Vec<Token<'a>>,
    pos: usize,
    /// Offset of the first `(` nested beyond [`MAX_DEPTH`], allowed only in the scoping
    /// rewrite's shape (checked once the whole selector is parsed).
    beyond: Option<usize>,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Token<'a> {
        self.tokens
            .get(self.pos)
            .copied()
            .unwrap_or(Token { tok: Tok::Eof, offset: self.input.len() })
    }

    fn bump(&mut self) -> Token<'a> {
        let token = self.peek();
        if token.tok != Tok::Eof {
            self.pos += 1;
        }
        token
    }

    fn unexpected(&self, token: Token<'a>, expected: &'static str) -> ParseError {
        let found = match token.tok {
            Tok::Label(key) => format!("label `{key}`"),
            Tok::Str(s) => format!("string {}", Quoted(s)),
            Tok::Has(key) => format!("`has({key})`"),
            Tok::All => "`all()`".to_owned(),
            Tok::Global => "`global()`".to_owned(),
            Tok::LParen => "`(`".to_owned(),
            Tok::RParen => "`)`".to_owned(),
            Tok::LBrace => "`{`".to_owned(),
            Tok::RBrace => "`}`".to_owned(),
            Tok::Comma => "`,`".to_owned(),
            Tok::Eq => "`==`".to_owned(),
            Tok::Ne => "`!=`".to_owned(),
            Tok::Not => "`!`".to_owned(),
            Tok::And => "`&&`".to_owned(),
            Tok::Or => "`||`".to_owned(),
            Tok::In => "`in`".to_owned(),
            Tok::NotIn => "`not in`".to_owned(),
            Tok::Contains => "`contains`".to_owned(),
            Tok::StartsWith => "`starts with`".to_owned(),
            Tok::EndsWith => "`ends with`".to_owned(),
            Tok::Eof => "the end of the selector".to_owned(),
        };
        ParseError::UnexpectedToken { column: column(self.input, token.offset), found, expected }
    }

    fn parse_or(&mut self, depth: usize) -> Result<Expr, ParseError> {
        let mut terms = vec![self.parse_and(depth)?];
        while self.peek().tok == Tok::Or {
            self.bump();
            terms.push(self.parse_and(depth)?);
        }
        Ok(if terms.len() == 1 { terms.remove(0) } else { Expr::Or(terms) })
    }

    fn parse_and(&mut self, depth: usize) -> Result<Expr, ParseError> {
        let mut terms = vec![self.parse_unary(depth)?];
        while self.peek().tok == Tok::And {
            self.bump();
            terms.push(self.parse_unary(depth)?);
        }
        Ok(if terms.len() == 1 { terms.remove(0) } else { Expr::And(terms) })
    }

    fn parse_unary(&mut self, depth: usize) -> Result<Expr, ParseError> {
        // A run of `!` is a loop, not recursion: Calico folds it into one boolean.
        let mut negated = false;
        while self.peek().tok == Tok::Not {
            self.bump();
            negated = !negated;
        }
        let token = self.bump();
        let expr = match token.tok {
            Tok::Has(key) => Expr::Has(key.to_owned()),
            Tok::All => Expr::All,
            Tok::Global => Expr::Global,
            Tok::Label(key) => self.parse_operation(key)?,
            Tok::LParen => {
                if depth >= MAX_DEPTH {
                    let first = *self.beyond.get_or_insert(token.offset);
                    // The rewrite adds one level; anything deeper stops here.
                    if depth > MAX_DEPTH {
                        return Err(ParseError::TooDeep { column: column(self.input, first) });
                    }
                }
                let inner = self.parse_or(depth + 1)?;
                let close = self.bump();
                if close.tok != Tok::RParen {
                    return Err(self.unexpected(close, "`&&`, `||` or `)`"));
                }
                inner
            }
            _ => return Err(self.unexpected(token, EXPECTED_OPERAND)),
        };
        Ok(if negated { Expr::Not(Box::new(expr)) } else { expr })
    }

    fn parse_operation(&mut self, key: &str) -> Result<Expr, ParseError> {
        let key = key.to_owned();
        let operator = self.bump();
        let op = match operator.tok {
            Tok::Eq => Comparison::Eq,
            Tok::Ne => Comparison::Ne,
            Tok::Contains => Comparison::Contains,
            Tok::StartsWith => Comparison::StartsWith,
            Tok::EndsWith => Comparison::EndsWith,
            Tok::In | Tok::NotIn => {
                let values = self.parse_set()?;
                return Ok(if operator.tok == Tok::In {
                    Expr::In { key, values }
                } else {
                    Expr::NotIn { key, values }
                });
            }
            _ => return Err(self.unexpected(operator, EXPECTED_OPERATOR)),
        };
        let value = self.bump();
        match value.tok {
            Tok::Str(value) => Ok(Expr::Compare { key, op, value: value.to_owned() }),
            _ => Err(self.unexpected(value, "a quoted string")),
        }
    }

    /// `{'a', 'b'}`; empty sets and a trailing comma are allowed, as in Calico.
    fn parse_set(&mut self) -> Result<Vec<String>, ParseError> {
        let open = self.bump();
        if open.tok != Tok::LBrace {
            return Err(self.unexpected(open, "`{` opening a set of strings"));
        }
        let mut values = Vec::new();
        while let Tok::Str(value) = self.peek().tok {
            self.bump();
            values.push(value.to_owned());
            if self.peek().tok != Tok::Comma {
                break;
            }
            self.bump();
        }
        let close = self.bump();
        if close.tok != Tok::RBrace {
            return Err(self.unexpected(close, "a quoted string, `,` or `}`"));
        }
        Ok(values)
    }
}

// === printing ===

/// A string literal in the quotes Calico can read back: single, or double when the value
/// holds a single quote. A value holding both cannot be written (the parser never makes one).
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.contains('\'') && !self.0.contains('"') {
            write!(f, "\"{}\"", self.0)
        } else {
            write!(f, "'{}'", self.0)
        }
    }
}

/// `expr`, parenthesised when `wrap` says so.
struct Operand<'a> {
    expr: &'a Expr,
    wrap: bool,
}

impl fmt::Display for Operand<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wrap { write!(f, "({})", self.expr) } else { write!(f, "{}", self.expr) }
    }
}

fn write_set(f: &mut fmt::Formatter<'_>, values: &[String]) -> fmt::Result {
    f.write_str("{")?;
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{}", Quoted(value))?;
    }
    f.write_str("}")
}

fn write_joined(
    f: &mut fmt::Formatter<'_>,
    terms: &[Expr],
    separator: &str,
    wrap: fn(&Expr) -> bool,
) -> fmt::Result {
    for (i, term) in terms.iter().enumerate() {
        if i > 0 {
            f.write_str(separator)?;
        }
        write!(f, "{}", Operand { expr: term, wrap: wrap(term) })?;
    }
    Ok(())
}

impl fmt::Display for Expr {
    /// Valid Calico syntax with only the parentheses the tree's shape needs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("all()"),
            Self::And(terms) if terms.is_empty() => f.write_str("all()"),
            Self::Or(terms) if terms.is_empty() => f.write_str("!all()"),
            Self::Global => f.write_str("global()"),
            Self::Has(key) => write!(f, "has({key})"),
            Self::Compare { key, op, value } => write!(f, "{key} {op} {}", Quoted(value)),
            Self::In { key, values } => {
                write!(f, "{key} in ")?;
                write_set(f, values)
            }
            Self::NotIn { key, values } => {
                write!(f, "{key} not in ")?;
                write_set(f, values)
            }
            Self::Not(inner) => {
                // `!!a` would read back as `a`, so a nested negation keeps its parentheses.
                let wrap = matches!(**inner, Self::And(_) | Self::Or(_) | Self::Not(_));
                write!(f, "!{}", Operand { expr: inner, wrap })
            }
            Self::And(terms) => {
                write_joined(f, terms, " && ", |t| matches!(t, Self::And(_) | Self::Or(_)))
            }
            Self::Or(terms) => write_joined(f, terms, " || ", |t| matches!(t, Self::Or(_))),
        }
    }
}

impl Expr {
    /// The Calico form of a Kubernetes label selector: `matchLabels` become `==`, `In`,
    /// `NotIn`, `Exists` and `DoesNotExist` become `in`, `not in`, `has` and `!has`.
    ///
    /// An unknown operator (which the apiserver rejects) is left out, which only widens the
    /// selector: analysis then errs towards reporting that it may select Windows pods.
    pub fn from_label_selector(selector: &LabelSelector) -> Self {
        let labels = selector.match_labels.iter().map(|(key, value)| Self::Compare {
            key: key.clone(),
            op: Comparison::Eq,
            value: value.clone(),
        });
        let expressions = selector.match_expressions.iter().filter_map(|req| {
            let key = req.key.clone();
            match req.operator.as_str() {
                "In" => Some(Self::In { key, values: req.values.clone() }),
                "NotIn" => Some(Self::NotIn { key, values: req.values.clone() }),
                "Exists" => Some(Self::Has(key)),
                "DoesNotExist" => Some(Self::Not(Box::new(Self::Has(key)))),
                _ => None,
            }
        });
        Self::conjunction(labels.chain(expressions).collect())
    }

    /// `terms` joined with `&&`: `all()` when empty, the term itself when alone.
    pub fn conjunction(mut terms: Vec<Self>) -> Self {
        match terms.len() {
            0 => Self::All,
            1 => terms.remove(0),
            _ => Self::And(terms),
        }
    }

    /// The terms of the top-level `&&` chain, looking through nested `&&` groups.
    pub fn conjuncts(&self) -> Vec<&Self> {
        let mut out = Vec::new();
        let mut stack = vec![self];
        while let Some(expr) = stack.pop() {
            match expr {
                Self::And(terms) => stack.extend(terms.iter().rev()),
                other => out.push(other),
            }
        }
        out
    }

    /// Whether any term of the selector reads the label `key`.
    pub fn mentions(&self, key: &str) -> bool {
        match self {
            Self::All | Self::Global => false,
            Self::Has(k) | Self::Compare { key: k, .. } => k == key,
            Self::In { key: k, .. } | Self::NotIn { key: k, .. } => k == key,
            Self::Not(inner) => inner.mentions(key),
            Self::And(terms) | Self::Or(terms) => terms.iter().any(|t| t.mentions(key)),
        }
    }

    /// Whether the selector evaluates, for a pod whose `key` label has `value` (or is absent
    /// for `None`) and whose other labels are unknown, to true, false, or either.
    fn evaluate(&self, key: &str, value: Option<&str>) -> Truth {
        match self {
            Self::All | Self::Global => Truth::True,
            Self::Has(k) if k == key => Truth::from(value.is_some()),
            Self::Compare { key: k, op, value: wanted } if k == key => Truth::from(match value {
                Some(actual) => op.holds(actual, wanted),
                None => *op == Comparison::Ne,
            }),
            Self::In { key: k, values } if k == key => {
                Truth::from(value.is_some_and(|v| values.iter().any(|w| w == v)))
            }
            Self::NotIn { key: k, values } if k == key => {
                Truth::from(value.is_none_or(|v| values.iter().all(|w| w != v)))
            }
            Self::Has(_) | Self::Compare { .. } | Self::In { .. } | Self::NotIn { .. } => {
                Truth::Unknown
            }
            Self::Not(inner) => inner.evaluate(key, value).not(),
            Self::And(terms) => {
                terms.iter().fold(Truth::True, |acc, t| acc.and(t.evaluate(key, value)))
            }
            Self::Or(terms) => {
                terms.iter().fold(Truth::False, |acc, t| acc.or(t.evaluate(key, value)))
            }
        }
    }
}

// === analysis ===

/// Kleene's three-valued logic: `Unknown` is a truth value that depends on unknown labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Truth {
    True,
    False,
    Unknown,
}

impl From<bool> for Truth {
    fn from(value: bool) -> Self {
        if value { Self::True } else { Self::False }
    }
}

impl Truth {
    fn not(self) -> Self {
        match self {
            Self::True => Self::False,
            Self::False => Self::True,
            Self::Unknown => Self::Unknown,
        }
    }

    fn and(self, other: Self) -> Self {
        match (self, other) {
            (Self::False, _) | (_, Self::False) => Self::False,
            (Self::True, Self::True) => Self::True,
            _ => Self::Unknown,
        }
    }

    fn or(self, other: Self) -> Self {
        match (self, other) {
            (Self::True, _) | (_, Self::True) => Self::True,
            (Self::False, Self::False) => Self::False,
            _ => Self::Unknown,
        }
    }
}

/// The OS label value of a Windows pod.
const WINDOWS: &str = "windows";
/// The OS label value of a Linux pod.
const LINUX: &str = "linux";

/// Whether the selector reads the OS label `key` and can select a pod labelled
/// `key: windows`, whatever its other labels.
///
/// Selectors that never read `key` (`all()`, `app == 'web'`) are merely unscoped, not
/// targeting Windows: that is for [`is_scoped_to_linux`] to judge.
pub fn targets_windows(expr: &Expr, key: &str) -> bool {
    expr.mentions(key) && expr.evaluate(key, Some(WINDOWS)) != Truth::False
}

/// Whether the selector cannot select a pod labelled `key: windows`, whatever its other labels:
/// the policy is scoped to Linux pods (and, if it selects them, pods without the label).
pub fn is_scoped_to_linux(expr: &Expr, key: &str) -> bool {
    expr.evaluate(key, Some(WINDOWS)) == Truth::False
}

/// Whether `expr` is the scoping term `key != 'windows'` or `key not in {'windows'}`.
pub fn is_scope_term(expr: &Expr, key: &str) -> bool {
    match expr {
        Expr::Compare { key: k, op: Comparison::Ne, value } => k == key && value == WINDOWS,
        Expr::NotIn { key: k, values } => {
            k == key && !values.is_empty() && values.iter().all(|v| v == WINDOWS)
        }
        _ => false,
    }
}

/// Whether `expr` is the legacy scoping term `key == 'linux'` or `key in {'linux'}`, which
/// earlier versions appended (it also left out pods without the label).
pub fn is_legacy_scope_term(expr: &Expr, key: &str) -> bool {
    match expr {
        Expr::Compare { key: k, op: Comparison::Eq, value } => k == key && value == LINUX,
        Expr::In { key: k, values } => {
            k == key && !values.is_empty() && values.iter().all(|v| v == LINUX)
        }
        _ => false,
    }
}

/// Whether the top-level `&&` chain already holds the scoping term for `key`.
pub fn has_scope_term(expr: &Expr, key: &str) -> bool {
    expr.conjuncts().into_iter().any(|t| is_scope_term(t, key))
}

/// The selector without the scoping terms for `key` (current or legacy) in its top-level `&&`
/// chain: what the author wrote before the mutating webhook appended one.
///
/// Removing such a term can only widen what the rest selects on Windows pods, and a chain
/// holding it selects no Windows pod at all; so the remainder is what to judge when asking
/// whether the author meant to select Windows pods.
pub fn without_scope_terms(expr: &Expr, key: &str) -> Expr {
    let is_term = |t: &Expr| is_scope_term(t, key) || is_legacy_scope_term(t, key);
    if !expr.conjuncts().into_iter().any(is_term) {
        return expr.clone();
    }
    let rest = expr.conjuncts().into_iter().filter(|t| !is_term(t)).cloned().collect();
    Expr::conjunction(rest)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::admission::objects::SelectorRequirement;

    const KEY: &str = "arcguard.io/os";

    fn eq(key: &str, value: &str) -> Expr {
        Expr::Compare { key: key.into(), op: Comparison::Eq, value: value.into() }
    }

    fn cmp(key: &str, op: Comparison, value: &str) -> Expr {
        Expr::Compare { key: key.into(), op, value: value.into() }
    }

    fn not(e: Expr) -> Expr {
        Expr::Not(Box::new(e))
    }

    fn set(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| (*v).to_owned()).collect()
    }

    fn parsed(s: &str) -> Expr {
        parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    #[test]
    fn valid_selectors_parse_to_the_expected_tree() {
        let cases: Vec<(&str, Expr)> = vec![
            ("", Expr::All),
            ("  \t ", Expr::All),
            ("all()", Expr::All),
            ("all( )", Expr::All),
            ("global()", Expr::Global),
            ("has(app)", Expr::Has("app".into())),
            ("has( arcguard.io/os )", Expr::Has(KEY.into())),
            ("app == 'web'", eq("app", "web")),
            ("app=='web'", eq("app", "web")),
            ("app == \"it's\"", eq("app", "it's")),
            ("app == 'say \"hi\"'", eq("app", "say \"hi\"")),
            ("app == ''", eq("app", "")),
            ("app != 'web'", cmp("app", Comparison::Ne, "web")),
            ("app contains 'we'", cmp("app", Comparison::Contains, "we")),
            ("app starts with 'w'", cmp("app", Comparison::StartsWith, "w")),
            ("app starts\twith 'w'", cmp("app", Comparison::StartsWith, "w")),
            ("app ends with 'b'", cmp("app", Comparison::EndsWith, "b")),
            ("app.kubernetes.io/name == 'x'", eq("app.kubernetes.io/name", "x")),
            ("projectcalico.org/namespace == 'ns-1'", eq("projectcalico.org/namespace", "ns-1")),
            ("my_label-2 == 'x'", eq("my_label-2", "x")),
            ("env in {'a', \"b\"}", Expr::In { key: "env".into(), values: set(&["a", "b"]) }),
            ("env in {}", Expr::In { key: "env".into(), values: vec![] }),
            ("env in {'a',}", Expr::In { key: "env".into(), values: set(&["a"]) }),
            ("env in{'a'}", Expr::In { key: "env".into(), values: set(&["a"]) }),
            ("env not in {'a'}", Expr::NotIn { key: "env".into(), values: set(&["a"]) }),
            ("env not  in {'a'}", Expr::NotIn { key: "env".into(), values: set(&["a"]) }),
            ("env notin {'a'}", Expr::NotIn { key: "env".into(), values: set(&["a"]) }),
            // Inside `has( )`, `all( )` and between operator words, Calico's regexes take `\s`.
            ("env not\n\tin {'a'}", Expr::NotIn { key: "env".into(), values: set(&["a"]) }),
            ("app starts\r\nwith 'w'", cmp("app", Comparison::StartsWith, "w")),
            ("has(\n a\x0c)", Expr::Has("a".into())),
            ("all(\r\n)", Expr::All),
            ("global(\n)", Expr::Global),
            // Keywords are only operators right after a label, so they can be keys.
            ("in == 'x'", eq("in", "x")),
            ("has == 'x'", eq("has", "x")),
            ("!has(a)", not(Expr::Has("a".into()))),
            ("!!has(a)", Expr::Has("a".into())),
            ("!!!has(a)", not(Expr::Has("a".into()))),
            ("!(!has(a))", not(not(Expr::Has("a".into())))),
            ("((a == 'x'))", eq("a", "x")),
            // Precedence: || loosest, then &&, then !.
            (
                "a == 'x' || b == 'y' && c == 'z'",
                Expr::Or(vec![eq("a", "x"), Expr::And(vec![eq("b", "y"), eq("c", "z")])]),
            ),
            (
                "a == 'x' && b == 'y' || c == 'z'",
                Expr::Or(vec![Expr::And(vec![eq("a", "x"), eq("b", "y")]), eq("c", "z")]),
            ),
            (
                "(a == 'x' || b == 'y') && c == 'z'",
                Expr::And(vec![Expr::Or(vec![eq("a", "x"), eq("b", "y")]), eq("c", "z")]),
            ),
            ("!a == 'x' && b == 'y'", Expr::And(vec![not(eq("a", "x")), eq("b", "y")])),
            ("!(a == 'x' && b == 'y')", not(Expr::And(vec![eq("a", "x"), eq("b", "y")]))),
            (
                "a == 'x' && b == 'y' && c == 'z'",
                Expr::And(vec![eq("a", "x"), eq("b", "y"), eq("c", "z")]),
            ),
            (
                "(a == 'x' && b == 'y') && c == 'z'",
                Expr::And(vec![Expr::And(vec![eq("a", "x"), eq("b", "y")]), eq("c", "z")]),
            ),
            (
                "a == 'x' || b == 'y' || c == 'z'",
                Expr::Or(vec![eq("a", "x"), eq("b", "y"), eq("c", "z")]),
            ),
            ("a == 'x' && all()", Expr::And(vec![eq("a", "x"), Expr::All])),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input), Ok(want), "{input:?}");
        }
    }

    #[test]
    fn invalid_selectors_are_rejected_saying_where_and_what() {
        let cases = [
            ("app = 'web'", "unexpected character '=' at column 5: expected `==`"),
            ("app == 'web", "unterminated string starting at column 8"),
            ("app == \"web", "unterminated string starting at column 8"),
            ("app == web", "expected a quoted string at column 8, found label `web`"),
            ("app ==", "expected a quoted string at column 7, found the end of the selector"),
            ("app", "expected an operator after the label"),
            ("app 'x'", "expected an operator after the label"),
            ("app is 'x'", "found `is`"),
            ("app starts 'x'", "at column 5, found `starts`"),
            ("app not 'x'", "at column 5, found `not`"),
            ("a == 'x' & b == 'y'", "unexpected character '&' at column 10: expected `&&`"),
            ("a == 'x' | b == 'y'", "unexpected character '|' at column 10: expected `||`"),
            ("a == 'x' &&", "found the end of the selector"),
            ("a == 'x' b == 'y'", "expected `&&`, `||` or the end of the selector at column 10"),
            ("(a == 'x'", "expected `&&`, `||` or `)` at column 10, found the end of the selector"),
            ("a == 'x')", "expected `&&`, `||` or the end of the selector at column 9, found `)`"),
            ("()", "at column 2, found `)`"),
            ("env in 'a'", "expected `{` opening a set of strings at column 8"),
            ("env in {'a' 'b'}", "expected a quoted string, `,` or `}` at column 13"),
            ("env in {,}", "expected a quoted string, `,` or `}` at column 9, found `,`"),
            ("env in {'a'", "found the end of the selector"),
            ("has()", "unexpected character ')' at column 5: expected a label inside `has(`"),
            ("has(a", "expected `)` at column 6, found the end of the selector"),
            ("has(a b)", "unexpected character 'b' at column 7: expected `)`"),
            ("all(x)", "unexpected character 'x' at column 5: expected `)`"),
            ("global(", "expected `)` at column 8"),
            ("has (a)", "expected an operator after the label"),
            ("a == 'x'\n&& b == 'y'", "unexpected character '\\n' at column 9"),
            ("é == 'x'", "unexpected character 'é' at column 1"),
            ("a == 'é' && ü", "unexpected character 'ü' at column 13"),
            ("'x'", "found string 'x'"),
            ("&& a == 'x'", "at column 1, found `&&`"),
            ("!", "found the end of the selector"),
            ("env in_ {'a'}", "at column 5, found `in_`"),
            ("env not inx {'a'}", "at column 5, found `not`"),
            ("a == 'x'\r&& b == 'y'", "unexpected character '\\r' at column 9"),
        ];
        for (input, want) in cases {
            let err = parse(input).expect_err(input).to_string();
            assert!(err.contains(want), "{input:?}: {err:?} should contain {want:?}");
        }
    }

    #[test]
    fn label_keys_are_at_most_512_bytes_as_calico_reads_them() {
        let key = "k".repeat(MAX_KEY_LEN);
        assert_eq!(parse(&format!("{key} == 'x'")), Ok(eq(&key, "x")));
        assert_eq!(parse(&format!("has({key})")), Ok(Expr::Has(key.clone())));
        // Calico reads 513 key bytes as two labels, which no operator follows...
        for long in [format!("{key}k == 'x'"), format!("has({key}k)"), format!("{key}kk in {{}}")] {
            assert!(parse(&long).is_err(), "{long}");
        }
        // ...unless the rest is an operator word.
        let glued = format!("{key}in {{'x'}}");
        assert_eq!(parse(&glued), Ok(Expr::In { key: key.clone(), values: set(&["x"]) }));
    }

    #[test]
    fn nesting_beyond_the_limit_is_an_error_not_a_stack_overflow() {
        let ok = format!("{}a == 'x'{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert_eq!(parse(&ok), Ok(eq("a", "x")));
        let deep = format!("{}a == 'x'{}", "(".repeat(MAX_DEPTH + 1), ")".repeat(MAX_DEPTH + 1));
        assert_eq!(parse(&deep), Err(ParseError::TooDeep { column: MAX_DEPTH + 1 }));
        // The scoping rewrite may add its one level to a selector at the limit, in its own
        // shape only; the column names the first parenthesis beyond the limit.
        let (open, close) = ("(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        for clause in
            ["arcguard.io/os != 'windows'", "arcguard.io/os == 'linux'", "os != 'windows'"]
        {
            let scoped = format!("({open}a == 'x'{close}) && {clause}");
            assert!(parse(&scoped).is_ok(), "{clause}");
        }
        let not_scoped = [
            format!("({open}a == 'x'{close}) && b == 'y'"),
            format!("({open}a == 'x'{close}) && os != 'windows' && b == 'y'"),
            format!("({open}a == 'x'{close}) || os != 'windows'"),
            format!("!({open}a == 'x'{close}) && os != 'windows'"),
            format!("(a == 'x') && ({open}b == 'y'{close}) && os != 'windows'"),
            format!("(({open}a == 'x'{close})) && os != 'windows'"),
        ];
        for input in not_scoped {
            assert!(matches!(parse(&input), Err(ParseError::TooDeep { .. })), "{input}");
        }
        let beyond = format!("(!({open}a == 'x'{close})) && os != 'windows'");
        assert_eq!(parse(&beyond), Err(ParseError::TooDeep { column: MAX_DEPTH + 2 }));
        let hostile = "(!".repeat(1_000_000);
        assert!(matches!(parse(&hostile), Err(ParseError::TooDeep { .. })));
        // Long flat chains and long runs of `!` do not recurse at all.
        let bangs = format!("{}has(a)", "!".repeat(1_000_001));
        assert_eq!(parse(&bangs), Ok(not(Expr::Has("a".into()))));
        let chain = vec!["a == 'x'"; 100_000].join(" && ");
        assert!(matches!(parse(&chain), Ok(Expr::And(terms)) if terms.len() == 100_000));
    }

    #[test]
    fn printing_gives_canonical_calico_syntax() {
        let cases = [
            ("app=='web'", "app == 'web'"),
            ("app == \"web\"", "app == 'web'"),
            ("app == \"it's\"", "app == \"it's\""),
            ("env in {\"a\",'b',}", "env in {'a', 'b'}"),
            ("env not in {}", "env not in {}"),
            ("has( a )", "has(a)"),
            ("all( )", "all()"),
            ("", "all()"),
            ("((a == 'x'))", "a == 'x'"),
            ("a == 'x' || (b == 'y' && c == 'z')", "a == 'x' || b == 'y' && c == 'z'"),
            ("(a == 'x' || b == 'y') && c == 'z'", "(a == 'x' || b == 'y') && c == 'z'"),
            ("(a == 'x' && b == 'y') && c == 'z'", "(a == 'x' && b == 'y') && c == 'z'"),
            ("a == 'x' || (b == 'y' || c == 'z')", "a == 'x' || (b == 'y' || c == 'z')"),
            ("!(a == 'x')", "!a == 'x'"),
            ("!(!has(a))", "!(!has(a))"),
            ("!(a == 'x' || has(b))", "!(a == 'x' || has(b))"),
            ("a starts  with 'x' && b ends with 'y'", "a starts with 'x' && b ends with 'y'"),
        ];
        for (input, want) in cases {
            let expr = parsed(input);
            assert_eq!(expr.to_string(), want, "{input:?}");
            assert_eq!(parse(want), Ok(expr), "{want:?} reads back");
        }
        assert_eq!(Expr::And(vec![]).to_string(), "all()");
        assert_eq!(Expr::Or(vec![]).to_string(), "!all()");
    }

    #[test]
    fn targets_windows_is_true_only_when_the_os_label_can_admit_windows() {
        let cases = [
            ("arcguard.io/os == 'windows'", true),
            ("arcguard.io/os in {'windows'}", true),
            ("arcguard.io/os in {'linux', 'windows'}", true),
            ("arcguard.io/os != 'linux'", true),
            ("arcguard.io/os not in {'linux'}", true),
            ("arcguard.io/os not in {'linux', 'solaris'}", true),
            ("has(arcguard.io/os)", true),
            ("!(arcguard.io/os == 'linux')", true),
            ("app == 'x' || arcguard.io/os == 'windows'", true),
            ("app == 'x' && arcguard.io/os == 'windows'", true),
            ("arcguard.io/os starts with 'win'", true),
            ("arcguard.io/os contains 'dow'", true),
            ("arcguard.io/os ends with 's'", true),
            ("arcguard.io/os == 'linux' || app == 'x'", true),
            ("!has(arcguard.io/os) || app == 'x'", true),
            ("(app == 'x' || arcguard.io/os == 'windows') && arcguard.io/os != 'solaris'", true),
            // Never selects a Windows pod.
            ("arcguard.io/os == 'linux'", false),
            ("arcguard.io/os in {'linux'}", false),
            ("arcguard.io/os != 'windows'", false),
            ("arcguard.io/os not in {'windows'}", false),
            ("!has(arcguard.io/os)", false),
            ("app == 'x' && arcguard.io/os == 'linux'", false),
            ("(app == 'x' || arcguard.io/os == 'windows') && arcguard.io/os == 'linux'", false),
            ("arcguard.io/os starts with 'lin'", false),
            ("!(arcguard.io/os == 'windows')", false),
            // Does not mention the key: unscoped, not targeting Windows.
            ("all()", false),
            ("", false),
            ("global()", false),
            ("app == 'x'", false),
            ("has(os)", false),
            ("kubernetes.io/os == 'windows'", false),
        ];
        for (input, want) in cases {
            assert_eq!(targets_windows(&parsed(input), KEY), want, "{input:?}");
        }
    }

    #[test]
    fn is_scoped_to_linux_requires_excluding_pods_labelled_windows_only() {
        let cases = [
            ("arcguard.io/os != 'windows'", true),
            ("arcguard.io/os not in {'windows'}", true),
            ("!(arcguard.io/os == 'windows')", true),
            ("(app == 'web') && arcguard.io/os != 'windows'", true),
            ("(a == 'x' || b == 'y') && arcguard.io/os != 'windows'", true),
            ("arcguard.io/os == 'linux'", true),
            ("arcguard.io/os in {'linux'}", true),
            ("(app == 'web') && arcguard.io/os == 'linux'", true),
            ("arcguard.io/os starts with 'lin'", true),
            ("arcguard.io/os == 'linux' || arcguard.io/os == 'bsd'", true),
            ("arcguard.io/os == 'windows'", false),
            ("has(arcguard.io/os)", false),
            ("arcguard.io/os != 'windows' || app == 'x'", false),
            ("arcguard.io/os != 'linux'", false),
            ("app == 'web'", false),
            ("all()", false),
            ("global()", false),
            ("other.io/os != 'windows'", false),
        ];
        for (input, want) in cases {
            assert_eq!(is_scoped_to_linux(&parsed(input), KEY), want, "{input:?}");
        }
    }

    #[test]
    fn scope_terms_are_found_and_removed_in_the_top_level_chain_only() {
        // (input, has the current term, without any scoping term)
        let cases = [
            ("arcguard.io/os != 'windows'", true, "all()"),
            ("arcguard.io/os not in {'windows'}", true, "all()"),
            ("arcguard.io/os not in {'windows', 'windows'}", true, "all()"),
            ("(app == 'web') && arcguard.io/os != 'windows'", true, "app == 'web'"),
            // The legacy term is removed too, but is not the current term.
            ("arcguard.io/os == 'linux'", false, "all()"),
            ("arcguard.io/os in {'linux'}", false, "all()"),
            ("(app == 'web') && arcguard.io/os == 'linux'", false, "app == 'web'"),
            (
                "(a == 'x' || arcguard.io/os == 'windows') && arcguard.io/os != 'windows'",
                true,
                "a == 'x' || arcguard.io/os == 'windows'",
            ),
            (
                "((a == 'x') && arcguard.io/os != 'windows') && other/os != 'windows'",
                true,
                "a == 'x' && other/os != 'windows'",
            ),
            (
                "arcguard.io/os != 'windows' || a == 'x'",
                false,
                "arcguard.io/os != 'windows' || a == 'x'",
            ),
            ("!(arcguard.io/os != 'windows')", false, "!arcguard.io/os != 'windows'"),
            (
                "arcguard.io/os not in {'linux', 'windows'}",
                false,
                "arcguard.io/os not in {'linux', 'windows'}",
            ),
            ("arcguard.io/os not in {}", false, "arcguard.io/os not in {}"),
            ("other/os != 'windows'", false, "other/os != 'windows'"),
        ];
        for (input, has, stripped) in cases {
            let expr = parsed(input);
            assert_eq!(has_scope_term(&expr, KEY), has, "{input:?}");
            assert_eq!(without_scope_terms(&expr, KEY).to_string(), stripped, "{input:?}");
        }
    }

    #[test]
    fn label_selectors_convert_to_equivalent_calico_selectors() {
        let req = |key: &str, operator: &str, values: &[&str]| SelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: set(values),
        };
        let cases = [
            (LabelSelector::default(), "all()"),
            (
                LabelSelector {
                    match_labels: [
                        ("b".to_owned(), "2".to_owned()),
                        ("a".to_owned(), "1".to_owned()),
                    ]
                    .into(),
                    match_expressions: vec![],
                },
                "a == '1' && b == '2'",
            ),
            (
                LabelSelector {
                    match_labels: Default::default(),
                    match_expressions: vec![
                        req(KEY, "In", &["windows"]),
                        req("tier", "NotIn", &["db", "cache"]),
                        req("app", "Exists", &[]),
                        req("legacy", "DoesNotExist", &[]),
                        req("zone", "Gt", &["1"]),
                    ],
                },
                "arcguard.io/os in {'windows'} && tier not in {'db', 'cache'} && has(app) && !has(legacy)",
            ),
            (
                LabelSelector {
                    match_labels: [("app".to_owned(), "web".to_owned())].into(),
                    match_expressions: vec![req(KEY, "In", &["linux"])],
                },
                "app == 'web' && arcguard.io/os in {'linux'}",
            ),
        ];
        for (selector, want) in cases {
            let expr = Expr::from_label_selector(&selector);
            assert_eq!(expr.to_string(), want);
            assert_eq!(parse(want), Ok(expr), "{want:?} reads back");
        }
    }

    #[test]
    fn kubernetes_selectors_are_judged_like_calico_ones() {
        let req = |operator: &str, values: &[&str]| SelectorRequirement {
            key: KEY.into(),
            operator: operator.into(),
            values: set(values),
        };
        let selector = |labels: &[(&str, &str)], exprs: Vec<SelectorRequirement>| LabelSelector {
            match_labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            match_expressions: exprs,
        };
        // (selector, targets Windows, scoped to Linux)
        let cases = [
            (selector(&[(KEY, "windows")], vec![]), true, false),
            (selector(&[], vec![req("In", &["windows"])]), true, false),
            (selector(&[], vec![req("NotIn", &["linux"])]), true, false),
            (selector(&[], vec![req("Exists", &[])]), true, false),
            (selector(&[(KEY, "linux")], vec![]), false, true),
            (selector(&[("app", "web")], vec![req("In", &["linux"])]), false, true),
            (selector(&[], vec![req("NotIn", &["windows"])]), false, true),
            (selector(&[("app", "web")], vec![req("NotIn", &["windows"])]), false, true),
            (selector(&[], vec![req("DoesNotExist", &[])]), false, true),
            (selector(&[("app", "web")], vec![]), false, false),
            (selector(&[], vec![]), false, false),
        ];
        for (selector, targets, scoped) in cases {
            let expr = Expr::from_label_selector(&selector);
            assert_eq!(targets_windows(&expr, KEY), targets, "{expr}");
            assert_eq!(is_scoped_to_linux(&expr, KEY), scoped, "{expr}");
        }
    }

    fn key_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("app".to_owned()),
            Just(KEY.to_owned()),
            Just("in".to_owned()),
            "[a-zA-Z0-9_./-]{1,12}",
        ]
    }

    fn value_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("linux".to_owned()),
            Just("windows".to_owned()),
            "[a-z' ]{0,6}",
            "[a-z\" ]{0,6}"
        ]
    }

    fn expr_strategy() -> impl Strategy<Value = Expr> {
        let ops = prop_oneof![
            Just(Comparison::Eq),
            Just(Comparison::Ne),
            Just(Comparison::Contains),
            Just(Comparison::StartsWith),
            Just(Comparison::EndsWith),
        ];
        let leaf =
            prop_oneof![
                Just(Expr::All),
                Just(Expr::Global),
                key_strategy().prop_map(Expr::Has),
                (key_strategy(), ops, value_strategy())
                    .prop_map(|(key, op, value)| Expr::Compare { key, op, value }),
                (key_strategy(), prop::collection::vec(value_strategy(), 0..3))
                    .prop_map(|(key, values)| Expr::In { key, values }),
                (key_strategy(), prop::collection::vec(value_strategy(), 0..3))
                    .prop_map(|(key, values)| Expr::NotIn { key, values }),
            ];
        leaf.prop_recursive(6, 48, 4, |inner| {
            prop_oneof![
                inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
                prop::collection::vec(inner.clone(), 2..4).prop_map(Expr::And),
                prop::collection::vec(inner, 2..4).prop_map(Expr::Or),
            ]
        })
    }

    proptest! {
        #[test]
        fn parsing_arbitrary_text_never_panics(input in any::<String>()) {
            let _ = parse(&input);
        }

        #[test]
        fn parsing_selector_like_text_never_panics_and_reprints_stably(
            input in "[a-z/.!&|=(){},' \"\t]{0,48}|(has\\(|all\\(\\)|global\\(\\)| in | not in | contains | starts with |'x'|\\(|\\)|&&|\\|\\||!|a|==){0,16}"
        ) {
            if let Ok(expr) = parse(&input) {
                let printed = expr.to_string();
                prop_assert_eq!(parse(&printed), Ok(expr), "{} printed as {}", input, printed);
            }
        }

        #[test]
        fn printed_trees_parse_back_to_the_same_tree(expr in expr_strategy()) {
            let printed = expr.to_string();
            prop_assert_eq!(parse(&printed), Ok(expr), "{}", printed);
        }

        #[test]
        fn stripping_the_appended_clause_recovers_what_the_author_selected(expr in expr_strategy()) {
            let scoped = Expr::And(vec![expr.clone(), cmp(KEY, Comparison::Ne, "windows")]);
            prop_assert!(has_scope_term(&scoped, KEY));
            prop_assert!(!targets_windows(&scoped, KEY));
            prop_assert!(is_scoped_to_linux(&scoped, KEY));
            let is_term = |t: &Expr| is_scope_term(t, KEY) || is_legacy_scope_term(t, KEY);
            if !expr.conjuncts().into_iter().any(is_term) {
                let stripped = without_scope_terms(&scoped, KEY);
                prop_assert_eq!(targets_windows(&stripped, KEY), targets_windows(&expr, KEY));
                prop_assert_eq!(is_scoped_to_linux(&stripped, KEY), is_scoped_to_linux(&expr, KEY));
            }
        }

        #[test]
        fn the_scoping_clause_keeps_unlabelled_pods_and_drops_windows_pods(expr in expr_strategy()) {
            let scoped = Expr::And(vec![expr.clone(), cmp(KEY, Comparison::Ne, "windows")]);
            // Pods without the label (and host endpoints) are selected exactly as before.
            prop_assert_eq!(scoped.evaluate(KEY, None), expr.evaluate(KEY, None));
            prop_assert_eq!(scoped.evaluate(KEY, Some("linux")), expr.evaluate(KEY, Some("linux")));
            prop_assert_eq!(scoped.evaluate(KEY, Some("windows")), Truth::False);
        }
    }
}
