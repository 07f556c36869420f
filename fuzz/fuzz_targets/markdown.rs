//! `gorp::matrix::render`: `markdown_to_html` and `split_message` on any text.
//!
//! The input is the text; when its first line is a number, that number (at most 70000) is
//! `max_bytes` and the text is the rest, else `max_bytes` is 64 plus the text's length modulo
//! 200.
//!
//! Checks, besides not panicking:
//! - HTML: only the tags Markdown produces (no raw HTML, images, inputs or scripts get through),
//!   only `href`, `title`, `class`, `start` and `style` attributes, and every `href` has no
//!   scheme or one of the safe ones, judged the way a browser reads the attribute;
//! - split: a text that fits is one part equal to it; otherwise every part but a lone one has
//!   text, removing the added fence lines gives back the text, the strings are the parts'
//!   lines put together, and when `max_bytes >= 64` every part fits in `max_bytes` and every
//!   part but the last leaves no code fence open, except the documented cases: the parts
//!   holding a fence's opening line that is cut because it is longer than a part, and a fence
//!   too long to repeat (its bare fence line and closer take more than a quarter of a part):
//!   a part that starts inside such a fence shows its text without it, so a line there that
//!   looks like a fence opener on its own may open one in that part.
#![no_main]

use gorp::matrix::render::{markdown_to_html, split_message, split_parts};
use libfuzzer_sys::fuzz_target;

const TAGS: &[&str] = &[
    "p",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "blockquote",
    "pre",
    "code",
    "ol",
    "ul",
    "li",
    "em",
    "strong",
    "del",
    "a",
    "hr",
    "br",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
];
const ATTRIBUTES: &[&str] = &["href", "title", "class", "start", "style"];
const SAFE_SCHEMES: &[&str] = &["http", "https", "ftp", "mailto", "magnet", "matrix", "mxc"];

fuzz_target!(|input: &str| {
    let (max_bytes, text) = match input.split_once('\n') {
        Some((first, rest)) if !first.is_empty() && first.bytes().all(|b| b.is_ascii_digit()) => (
            first.parse::<usize>().unwrap_or(usize::MAX).min(70_000),
            rest,
        ),
        _ => (64 + input.len() % 200, input),
    };
    check_html(&markdown_to_html(text));
    check_split(text, max_bytes);
});

fn check_html(html: &str) {
    let mut rest = html;
    while let Some(open) = rest.find('<') {
        let after = &rest[open + 1..];
        let end = after
            .find('>')
            .unwrap_or_else(|| panic!("unclosed tag in {html:?}"));
        let tag = &after[..end];
        rest = &after[end + 1..];
        let tag = tag
            .strip_prefix('/')
            .unwrap_or(tag)
            .trim_end_matches('/')
            .trim_end();
        let name_end = tag.find(' ').unwrap_or(tag.len());
        let name = &tag[..name_end];
        assert!(TAGS.contains(&name), "tag <{name}> in {html:?}");
        let mut attrs = &tag[name_end..];
        while let Some(eq) = attrs.find("=\"") {
            let attr = attrs[..eq].trim();
            assert!(ATTRIBUTES.contains(&attr), "attribute {attr:?} in {html:?}");
            let value_len = attrs[eq + 2..].find('"').expect("attribute value closes");
            let value = &attrs[eq + 2..eq + 2 + value_len];
            if attr == "href" {
                check_href(value, html);
            }
            attrs = &attrs[eq + 2 + value_len + 1..];
        }
        assert!(attrs.trim().is_empty(), "{attrs:?} in {html:?}");
    }
}

/// A browser reads `href` by unescaping it, dropping leading and trailing C0 controls and
/// spaces and every tab and line break, then taking `[a-zA-Z][a-zA-Z0-9+.-]*:` as the scheme.
fn check_href(value: &str, html: &str) {
    assert!(!value.contains('<') && !value.contains('>'));
    let unescaped = value
        .replace("&quot;", "\"")
        .replace("&#x27;", "'")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    let url: String = unescaped
        .trim_matches(|c: char| c <= ' ')
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .collect();
    let Some(colon) = url.find(':') else { return };
    let scheme = &url[..colon];
    let is_scheme = scheme
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if is_scheme {
        assert!(
            SAFE_SCHEMES.iter().any(|s| s.eq_ignore_ascii_case(scheme)),
            "unsafe link {value:?} in {html:?}"
        );
    }
}

/// An open fenced code block, by the rules `split_message` documents.
struct Fence {
    ch: u8,
    len: usize,
}

fn indent_ok(body: &str) -> Option<&str> {
    let indent = body.len() - body.trim_start_matches(' ').len();
    (indent <= 3).then(|| &body[indent..])
}

fn fence_open(line: &str) -> Option<Fence> {
    let rest = indent_ok(line.trim_end_matches(['\n', '\r']))?;
    let ch = *rest
        .as_bytes()
        .first()
        .filter(|c| **c == b'`' || **c == b'~')?;
    let len = rest.bytes().take_while(|c| *c == ch).count();
    if len < 3 || (ch == b'`' && rest[len..].contains('`')) {
        return None;
    }
    Some(Fence { ch, len })
}

fn fence_closes(fence: &Fence, line: &str) -> bool {
    let Some(rest) = indent_ok(line.trim_end_matches(['\n', '\r'])) else {
        return false;
    };
    let len = rest.bytes().take_while(|c| *c == fence.ch).count();
    len >= fence.len && rest[len..].trim_matches([' ', '\t']).is_empty()
}

/// The fence open at the end of `text`.
fn open_fence_at_end(text: &str) -> Option<Fence> {
    let mut open: Option<Fence> = None;
    for line in text.split_inclusive('\n') {
        open = match open {
            Some(f) if fence_closes(&f, line) => None,
            Some(f) => Some(f),
            None => fence_open(line),
        };
    }
    open
}

/// The byte ranges of `text`'s fence opening lines that a part boundary cuts.
fn cut_opening_lines(text: &str, parts: &[gorp::matrix::render::Part]) -> Vec<(usize, usize)> {
    let mut bounds = Vec::new();
    let mut at = 0;
    for p in parts {
        at += p.body.len();
        bounds.push(at);
    }
    let mut ranges = Vec::new();
    let mut open: Option<Fence> = None;
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        let end = start + line.len();
        open = match open {
            Some(f) if fence_closes(&f, line) => None,
            Some(f) => Some(f),
            None => {
                let opened = fence_open(line);
                if opened.is_some() && bounds.iter().any(|&b| start < b && b < end) {
                    ranges.push((start, end));
                }
                opened
            }
        };
        start = end;
    }
    ranges
}

fn check_split(text: &str, max_bytes: usize) {
    let strings = split_message(text, max_bytes);
    let parts = split_parts(text, max_bytes);
    assert_eq!(strings.len(), parts.len());
    assert!(!parts.is_empty());
    if text.len() <= max_bytes {
        assert_eq!(strings, [text]);
        return;
    }
    let joined: String = parts.iter().map(|p| p.body.as_str()).collect();
    assert_eq!(joined, text, "max {max_bytes}");
    for (s, p) in strings.iter().zip(&parts) {
        assert!(!p.body.is_empty(), "empty part, max {max_bytes}");
        assert_eq!(*s, format!("{}{}{}", p.prefix, p.body, p.suffix));
    }
    if max_bytes >= 64 {
        for s in &strings {
            assert!(
                s.len() <= max_bytes,
                "part of {} bytes > {max_bytes}: {s:?}",
                s.len()
            );
        }
        // Documented exceptions: the parts that hold a fence's opening line cut because it is
        // longer than a part, and a fence whose bare lines (fence and closer) take more than a
        // quarter of a part.
        let cut_openers = cut_opening_lines(text, &parts);
        let mut start = 0;
        for (s, p) in strings[..strings.len() - 1].iter().zip(&parts) {
            let end = start + p.body.len();
            // The fence open in the original text where this part starts, when it is too long
            // to repeat (so the part shows that text without it).
            let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
            let unrepeated = open_fence_at_end(&text[..line_start])
                .filter(|f| 2 * (f.len + 1) > max_bytes / 4)
                .is_some();
            let exempt = unrepeated || cut_openers.iter().any(|&(a, b)| start < b && a < end);
            if let (Some(fence), false) = (open_fence_at_end(s), exempt) {
                assert!(
                    2 * (fence.len + 1) > max_bytes / 4,
                    "max {max_bytes}: fence left open in {s:?}"
                );
            }
            start = end;
        }
    }
}
