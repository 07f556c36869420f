//! Untrusted Markdown (agent output, prompts) → HTML that only has the tags Markdown itself
//! produces. The Matrix bot and the dashboard render through it.

use pulldown_cmark::{CowStr, Event as MdEvent, Options, Parser, Tag, TagEnd};

/// URL schemes a link or image in agent output may use; other links show as their text.
const SAFE_SCHEMES: [&str; 7] = ["http", "https", "ftp", "mailto", "magnet", "matrix", "mxc"];

/// Markdown → HTML for a Matrix `formatted_body` or a dashboard page (CommonMark with tables,
/// strikethrough and task lists).
///
/// Agent output is untrusted, so the HTML only has the tags Markdown itself produces:
/// - raw HTML in the input, block or inline, appears as escaped text, never as tags (an HTML
///   block becomes a paragraph, its lines kept by `<br />`);
/// - images become links to the image (clients do not fetch anything), or their alt text
///   inside a link;
/// - links whose scheme is not in http, https, ftp, mailto, magnet, matrix or mxc (e.g.
///   `javascript:`) show as their text only;
/// - task list markers are `☑`/`☐` characters, since Matrix clients drop `<input>` (and a
///   page should not show a checkbox no one can tick).
pub fn markdown_to_html(md: &str) -> String {
    let options =
        Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS;
    let mut events: Vec<MdEvent> = Vec::new();
    // For each open link or image: whether its start was kept (as a link) or dropped.
    let mut links: Vec<bool> = Vec::new();
    let mut in_html_block = false;
    for event in Parser::new_ext(md, options) {
        match event {
            MdEvent::Start(Tag::HtmlBlock) => {
                in_html_block = true;
                events.push(MdEvent::Start(Tag::Paragraph));
            }
            MdEvent::End(TagEnd::HtmlBlock) => {
                in_html_block = false;
                if matches!(events.last(), Some(MdEvent::HardBreak)) {
                    events.pop();
                }
                events.push(MdEvent::End(TagEnd::Paragraph));
            }
            MdEvent::Html(html) | MdEvent::InlineHtml(html) if in_html_block => {
                for line in html.split_inclusive('\n') {
                    let text = line.trim_end_matches(['\n', '\r']);
                    if !text.is_empty() {
                        events.push(MdEvent::Text(CowStr::from(text.to_string())));
                    }
                    if line.ends_with('\n') {
                        events.push(MdEvent::HardBreak);
                    }
                }
            }
            MdEvent::Html(html) | MdEvent::InlineHtml(html) => events.push(MdEvent::Text(html)),
            MdEvent::Start(Tag::Link {
                link_type,
                dest_url,
                title,
                id,
            })
            | MdEvent::Start(Tag::Image {
                link_type,
                dest_url,
                title,
                id,
            }) => {
                // An image inside a link shows its alt text: links do not nest.
                let keep = safe_url(&dest_url) && !links.contains(&true);
                links.push(keep);
                if keep {
                    events.push(MdEvent::Start(Tag::Link {
                        link_type,
                        dest_url,
                        title,
                        id,
                    }));
                }
            }
            MdEvent::End(TagEnd::Link) | MdEvent::End(TagEnd::Image) => {
                if links.pop().unwrap_or(false) {
                    // An image without alt text would be an empty, invisible link.
                    if let Some(MdEvent::Start(Tag::Link { dest_url, .. })) = events.last() {
                        let url = dest_url.clone();
                        events.push(MdEvent::Text(url));
                    }
                    events.push(MdEvent::End(TagEnd::Link));
                }
            }
            MdEvent::TaskListMarker(done) => {
                events.push(MdEvent::Text(CowStr::from(if done {
                    "☑ "
                } else {
                    "☐ "
                })));
            }
            other => events.push(other),
        }
    }
    let mut html = String::with_capacity(md.len() + md.len() / 4);
    pulldown_cmark::html::push_html(&mut html, events.into_iter());
    html
}

/// Whether a link destination is relative or uses one of [`SAFE_SCHEMES`].
pub fn safe_url(url: &str) -> bool {
    let url = url.trim();
    let Some(colon) = url.find(':') else {
        return true;
    };
    let scheme = &url[..colon];
    let is_scheme = scheme
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !is_scheme {
        // A colon after a '/', '?' or '#' is part of a relative path, query or fragment.
        return scheme.contains(['/', '?', '#']);
    }
    SAFE_SCHEMES.iter().any(|s| s.eq_ignore_ascii_case(scheme))
}
