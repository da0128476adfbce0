//! v2 pass-through mechanics: which headers cross the gateway, how the
//! upstream's answer becomes the caller's (links and `Location` pointed back
//! at the gateway), the gateway's public base URL, and the version documents
//! OpenStack clients use for discovery.

use axum::body::Body;
use bytes::Bytes;
use http::Response;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};

/// Headers that belong to one connection, never forwarded (RFC 9110 7.6.1),
/// plus the ones toastgate owns on each side. Compared as `HeaderName`s,
/// never as strings: a standard name is an enum tag, and a custom one
/// differs from it by that tag alone (`as_str` on a standard name reads a
/// table this runs too rarely to keep in cache). A `static`, not a
/// `const`: a `const` array would be built and dropped on every call.
/// This runs for every header of every answer.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    static HOP_BY_HOP: [HeaderName; 9] = [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ];
    HOP_BY_HOP.contains(name)
}

/// The only caller headers that reach the upstream. An allow list, not a
/// deny list: the caller's credential (toastgate puts the cloud token in
/// `X-Auth-Token` instead), cookies, and headers an upstream might trust
/// (`X-Roles`, `X-Service-Token`, `X-Identity-Status`, forwarding headers)
/// never pass. `Accept-Encoding` stays out so links can be rewritten.
/// `Content-Type` is the gateway's to set ([`upstream_request_headers`]).
/// Compared as `HeaderName`s, as [`is_hop_by_hop`] does.
fn is_forwarded(name: &HeaderName) -> bool {
    static FORWARDED: [HeaderName; 6] = [
        header::ACCEPT,
        header::ACCEPT_LANGUAGE,
        header::USER_AGENT,
        HeaderName::from_static("openstack-api-version"),
        HeaderName::from_static("x-openstack-nova-api-version"),
        HeaderName::from_static("x-openstack-request-id"),
    ];
    FORWARDED.contains(name)
}

/// Removes hop-by-hop headers, including any named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Passes over the (few) headers present, not a lookup per hop-by-hop
    // name. Most answers' `Connection` lists only `keep-alive` (hop-by-hop
    // anyway): then only the fixed names go, one pass per four of them
    // (one pass for nearly every answer). Otherwise each header is also
    // compared with the names `Connection` lists, as they are (no header
    // name parsed).
    let connection = headers.get_all(header::CONNECTION);
    // A plain `keep-alive` value is recognised whole, before any splitting.
    let lists_more = connection
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"keep-alive"))
        && connection_names(&connection).any(|n| !n.eq_ignore_ascii_case("keep-alive"));
    if !lists_more {
        // Only the fixed names: gathered on the stack, four at a time (an
        // answer rarely has more than `Connection`), nothing allocated.
        loop {
            let mut gone: [Option<HeaderName>; 4] = Default::default();
            for (slot, name) in gone
                .iter_mut()
                .zip(headers.keys().filter(|k| is_hop_by_hop(k)))
            {
                *slot = Some(name.clone());
            }
            let full = gone[3].is_some();
            for name in gone.into_iter().flatten() {
                headers.remove(name);
            }
            if !full {
                return;
            }
        }
    }
    let gone: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            is_hop_by_hop(k)
                || connection_names(&connection).any(|n| n.eq_ignore_ascii_case(k.as_str()))
        })
        .cloned()
        .collect();
    for name in gone {
        headers.remove(name);
    }
}

/// The names the `Connection` values list (header names are
/// case-insensitive; compare with `eq_ignore_ascii_case`).
fn connection_names<'a>(
    connection: &header::GetAll<'a, HeaderValue>,
) -> impl Iterator<Item = &'a str> {
    connection
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !n.is_empty())
}

/// The caller's headers as they may go upstream (before the token is added).
/// A judged JSON body goes out as `application/json` whatever the caller
/// called it; a request without one carries no `Content-Type`.
pub fn upstream_request_headers(caller: &HeaderMap, json_body: bool) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(8);
    // One pass over what the caller sent (a handful of headers), keeping
    // what the allow list names.
    for (name, value) in caller {
        if is_forwarded(name) {
            out.append(name.clone(), value.clone());
        }
    }
    if json_body {
        out.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    out
}

/// The upstream's answer as the caller gets it: hop-by-hop headers out,
/// `Location` and every link in a JSON body pointed back at the gateway.
pub fn answer(
    upstream: Response<Bytes>,
    tenant_id: &str,
    gateway_project_base: &str,
) -> Response<Body> {
    let (mut parts, bytes) = upstream.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(new) = parts
        .headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|loc| rewrite_location(loc, tenant_id, gateway_project_base))
        .and_then(|new| HeaderValue::from_str(&new).ok())
    {
        parts.headers.insert(header::LOCATION, new);
    }
    let bytes = match is_json(&parts.headers)
        .then(|| rewrite_links(&bytes, tenant_id, gateway_project_base))
        .flatten()
    {
        Some(rewritten) => Bytes::from(rewritten),
        None => bytes,
    };
    // The body is whole: its length is known (and may have changed).
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(bytes))
}

pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// The base URL callers reach the gateway at: `server.public_url`, else the
/// request's `Host`, or its `:authority` on HTTP/2 (checked, since it is
/// echoed into links); followed by `tail` (the string is allocated once).
pub fn public_base(
    public_url: Option<&str>,
    scheme: &str,
    headers: &HeaderMap,
    authority: Option<&str>,
    tail: &[&str],
) -> String {
    let origin: [&str; 3] = match public_url {
        Some(url) => [url, "", ""],
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .or(authority)
                .filter(|h| is_plausible_host(h))
                .unwrap_or("localhost");
            [scheme, "://", host]
        }
    };
    let length = |parts: &[&str]| parts.iter().map(|p| p.len()).sum::<usize>();
    let mut base = String::with_capacity(length(&origin) + length(tail));
    for part in origin.iter().chain(tail) {
        base.push_str(part);
    }
    base
}

/// Host header values are echoed into links: accept only host[:port].
fn is_plausible_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

/// Points every upstream link that names `tenant_id` back at the gateway.
///
/// Upstream hrefs come in two shapes (both in the spec's examples), on any
/// host, including internal ones such as `http://nova.iaas...:8774`:
/// `scheme://host[/prefix]/v2/{tenant}/...` (self) and
/// `scheme://host[/prefix]/{tenant}/...` (bookmark). Both become
/// `{gateway_project_base}/...` where the base is `https://gateway/v2/{project}`.
/// Returns `None` when nothing had to change (the common case for bodies with
/// no links, which then go out without a copy).
///
/// It looks for URLs, not for the tenant: every `"http://` / `"https://`
/// string (found by its `://`), then the tenant among that URL's path
/// segments. A hex tenant id would match all over a JSON body full of hex
/// ids; `://` does not. (Measured: searching for the tenant and then for the
/// string around it took 5.1k more instructions per `GET servers/detail`,
/// `bench/callgrind.sh`.)
///
/// `://` is found through its first slash, with a one-byte search (cheaper
/// per byte than a search for the three bytes): a Nova body has few
/// slashes outside its URLs (a `user_data` or key can have some; each costs
/// one more search). Once a link is rewritten, the rest of its string (the
/// slashes of `/servers/{id}`) is skipped with one more one-byte search,
/// for its closing quote. (Measured on the benchmark's body, 16 links in
/// 7.9 KB, against the three-byte search: 9.4k -> 8.5k instructions, 0.55
/// -> 0.45 us; bench/README.md, `rewrite_cost`.)
pub fn rewrite_links(body: &[u8], tenant_id: &str, gateway_project_base: &str) -> Option<Vec<u8>> {
    if tenant_id.is_empty() {
        return None;
    }
    let mut out: Option<Vec<u8>> = None;
    let mut copied_up_to = 0;
    // The links of one answer nearly always share scheme, host and path up
    // to the tenant, in the spec's two shapes (self and bookmark): the part
    // (from the scheme to the end of the tenant segment) of the last two
    // links that had to be scanned is compared first, instead of a scan of
    // each segment. Same answer: the scan reads only that part's bytes, and
    // the byte after it is checked as the scan would.
    let mut known_heads = [0..0, 0..0];
    let (slashes, quotes) = (ByteSearch::new(b'/'), ByteSearch::new(b'"'));
    let mut from = 0;
    while let Some(found) = slashes.find(&body[from..]) {
        let slash = from + found;
        from = slash + 1;
        let Some(separator) = scheme_separator_at(body, slash) else {
            continue;
        };
        let Some(url_start) = url_start(body, separator) else {
            continue;
        };
        if url_start < copied_up_to {
            continue;
        }
        let known = known_heads
            .iter()
            .find_map(|head| same_link_head(body, url_start, head.clone()));
        let link_end = match known {
            Some(end) => end,
            None => {
                let after_scheme = separator + 3;
                let Some(tenant_end) =
                    tenant_segment_end(&body[after_scheme..], tenant_id.as_bytes())
                else {
                    continue;
                };
                let end = after_scheme + tenant_end;
                known_heads = [url_start..end, known_heads[0].clone()];
                end
            }
        };
        let buf = out.get_or_insert_with(|| Vec::with_capacity(body.len() + 256));
        buf.extend_from_slice(&body[copied_up_to..url_start]);
        buf.extend_from_slice(gateway_project_base.as_bytes());
        copied_up_to = link_end;
        // The rest of this string cannot start a link (no quote in it):
        // its slashes need not be looked at. This relies on a link ending
        // only before `/`, `"`, `?` or `#` (same_link_head,
        // tenant_segment_end): never inside a `"http` that could open one.
        from = quotes
            .find(&body[link_end..])
            .map_or(body.len(), |q| link_end + q);
    }
    out.map(|mut buf| {
        buf.extend_from_slice(&body[copied_up_to..]);
        buf
    })
}

/// A one-byte search whose CPU-specific variant is chosen once per body,
/// not on every call: `memchr::memchr` looks it up through a function
/// pointer each time (~16 instructions), and a body takes a search per
/// slash outside a rewritten link plus one per link. (Measured on the
/// benchmark's body, 16 links, callgrind: 8.8k -> 8.2k instructions per
/// rewrite.)
enum ByteSearch {
    #[cfg(target_arch = "x86_64")]
    Avx2(memchr::arch::x86_64::avx2::memchr::One),
    Any(u8),
}

impl ByteSearch {
    fn new(byte: u8) -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(one) = memchr::arch::x86_64::avx2::memchr::One::new(byte) {
            return Self::Avx2(one);
        }
        Self::Any(byte)
    }

    #[inline]
    fn find(&self, haystack: &[u8]) -> Option<usize> {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(one) => one.find(haystack),
            Self::Any(byte) => memchr::memchr(*byte, haystack),
        }
    }
}

/// Where `://` starts, if the slash at `slash` is its first slash.
fn scheme_separator_at(body: &[u8], slash: usize) -> Option<usize> {
    let separator = slash.checked_sub(1)?;
    (body.get(separator..separator + 3)? == b"://").then_some(separator)
}

/// Where the link at `url_start` ends, if it starts with the same bytes as
/// the head of a link already rewritten, `head`, and is followed by a byte
/// that ends a path segment (as [`tenant_segment_end`] requires).
fn same_link_head(body: &[u8], url_start: usize, head: std::ops::Range<usize>) -> Option<usize> {
    let end = url_start + head.len();
    (!head.is_empty()
        && body.get(url_start..end)? == &body[head]
        && matches!(body.get(end), Some(b'/' | b'"' | b'?' | b'#')))
    .then_some(end)
}

/// Where the JSON string holding the URL whose `://` is at `separator`
/// starts (just after its opening quote), if it is `"http://` or `"https://`
/// and the value of an `href` key: where Nova puts every link (`links`,
/// `servers_links`, `flavors_links`, in either key order). Any other string
/// is the caller's data (a metadata value, a name, a URL quoted inside a
/// longer text) and is never touched, whatever URL it holds.
fn url_start(body: &[u8], separator: usize) -> Option<usize> {
    let before = &body[..separator];
    let start = [&b"\"https"[..], &b"\"http"[..]]
        .iter()
        .find(|scheme| before.ends_with(scheme))
        .map(|scheme| separator - scheme.len() + 1)?;
    is_href_value(&body[..start - 1]).then_some(start)
}

/// Whether `before` (a body up to a string's opening quote) ends with an
/// `"href"` key and its colon, JSON whitespace allowed around the colon.
/// An escaped quote (`\"`) never passes: the byte before it is `\`.
fn is_href_value(before: &[u8]) -> bool {
    // Nova writes compact JSON: `"href": "` with one space, or none; those
    // are read without a scan.
    for compact in [&b"\"href\": "[..], &b"\"href\":"[..]] {
        if let Some(before_key) = before.strip_suffix(compact) {
            return key_quote_is_real(before_key);
        }
    }
    let trimmed = |b: &[u8]| -> usize {
        b.iter()
            .rposition(|c| !matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
            .map_or(0, |last| last + 1)
    };
    let before = &before[..trimmed(before)];
    let Some(key) = before.strip_suffix(b":") else {
        return false;
    };
    let Some(before_key) = key[..trimmed(key)].strip_suffix(b"\"href\"") else {
        return false;
    };
    key_quote_is_real(before_key)
}

/// The key's opening quote, after `before_key`, is a real one, not an
/// escaped quote inside a string (`"x\"href":...`): an even number of
/// backslashes before it.
fn key_quote_is_real(before_key: &[u8]) -> bool {
    let backslashes = before_key.iter().rev().take_while(|&&b| b == b'\\').count();
    backslashes % 2 == 0
}

/// In `rest` (what follows a URL's `://`), the end of the first path
/// segment equal to `tenant`, relative to `rest`: one pass over the URL up to
/// that segment. `None` when the path (before any `?` or `#`) has no such
/// segment, the host is empty, or the string holds an escape or a space
/// before it (not a plain URL: left alone). Everything after the segment is
/// copied as it is, so it need not be read.
fn tenant_segment_end(rest: &[u8], tenant: &[u8]) -> Option<usize> {
    // memchr rather than a byte loop: the host alone is ~30 bytes, and this
    // runs for every link of every answer.
    let mut slash = memchr::memchr(b'/', rest).filter(|&host_end| host_end > 0)?;
    let mut checked = 0;
    loop {
        if memchr::memchr3(b'"', b'\\', b' ', &rest[checked..slash]).is_some()
            || memchr::memchr2(b'?', b'#', &rest[checked..slash]).is_some()
        {
            return None;
        }
        let end = slash + 1 + tenant.len();
        if matches!(rest.get(end), Some(b'/' | b'"' | b'?' | b'#'))
            && &rest[slash + 1..end] == tenant
        {
            return Some(end);
        }
        checked = slash + 1;
        slash = checked + memchr::memchr(b'/', &rest[checked..])?;
    }
}

/// Same rewrite for a single header value such as `Location`.
pub fn rewrite_location(
    value: &str,
    tenant_id: &str,
    gateway_project_base: &str,
) -> Option<String> {
    // Written as a link of a body is (an `href` value) and rewritten alike.
    const KEY: &str = "\"href\":\"";
    let link = format!("{KEY}{value}\"");
    let rewritten = rewrite_links(link.as_bytes(), tenant_id, gateway_project_base)?;
    let s = String::from_utf8(rewritten).ok()?;
    Some(s.strip_prefix(KEY)?.strip_suffix('"')?.to_string())
}

fn version_object(base: &str) -> Value {
    json!({
        "id": "v2.0",
        "status": "SUPPORTED",
        "version": "",
        "min_version": "",
        "updated": "2011-01-21T11:33:21Z",
        "links": [{"rel": "self", "href": format!("{base}/v2/")}],
    })
}

/// `GET /`: the list of versions, as OpenStack SDK discovery expects.
pub fn versions_document(base: &str) -> Value {
    json!({"versions": [version_object(base)]})
}

/// `GET /v2/`: the one version toastgate serves.
pub fn version_document(base: &str) -> Value {
    let mut v = version_object(base);
    if let Some(obj) = v.as_object_mut() {
        obj.insert(
            "media-types".into(),
            json!([{"base": "application/json", "type": "application/vnd.openstack.compute+json;version=2"}]),
        );
        obj.insert(
            "links".into(),
            json!([
                {"rel": "self", "href": format!("{base}/v2/")},
                {"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"}
            ]),
        );
    }
    json!({"version": v})
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const T: &str = "6cdebe3eb0094910bc41f1d42ebe4cb7";

    #[test]
    fn rewrites_self_and_bookmark_links_on_any_host() {
        let body = format!(
            r#"{{"links":[{{"href":"https://kr1-api-compute.cloud.toast.com/v2/{T}/servers/abc","rel":"self"}},{{"href":"http://nova.iaas.tcc1.cloud.toastoven.net:8774/{T}/servers/abc","rel":"bookmark"}}],"servers_links":[{{"href":"https://h/v2/{T}/servers?limit=1&marker=abc","rel":"next"}}],"tenant_id":"{T}"}}"#
        );
        let out = rewrite_links(body.as_bytes(), T, "http://gw:8080/v2/web").unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            r#"{"links":[{"href":"http://gw:8080/v2/web/servers/abc","rel":"self"},{"href":"http://gw:8080/v2/web/servers/abc","rel":"bookmark"}],"servers_links":[{"href":"http://gw:8080/v2/web/servers?limit=1&marker=abc","rel":"next"}],"tenant_id":"6cdebe3eb0094910bc41f1d42ebe4cb7"}"#
        );
    }

    #[test]
    fn leaves_bodies_without_links_alone() {
        assert!(rewrite_links(br#"{"servers":[]}"#, T, "http://gw/v2/web").is_none());
        // The tenant id as a plain value or inside a longer segment is data, not a link.
        let b = format!(r#"{{"tenant_id":"{T}","x":"https://h/{T}x/y"}}"#);
        assert!(rewrite_links(b.as_bytes(), T, "http://gw/v2/web").is_none());
        let b = format!(r#"{{"note":"see /{T}/servers"}}"#);
        assert!(rewrite_links(b.as_bytes(), T, "http://gw/v2/web").is_none());
        // A URL that is not the value of an `href` is the caller's data: a
        // metadata value, a name, a link quoted inside a longer text.
        for b in [
            format!(r#"{{"metadata":{{"runbook":"https://wiki.example.com/p/{T}/runbook"}}}}"#),
            format!(r#"{{"name":"https://h/v2/{T}/servers"}}"#),
            format!(r#"{{"description":"see \"href\": \"https://h/v2/{T}/x\""}}"#),
            format!(r#"{{"description":"a\"href\":\"https://h/v2/{T}/x"}}"#),
            format!(r#"["https://h/v2/{T}/x"]"#),
            format!(r#"{{"hrefs":"https://h/v2/{T}/x","xhref":"https://h/v2/{T}/x"}}"#),
            format!(r#"{{"x\"href":"https://h/v2/{T}/x"}}"#),
        ] {
            assert!(
                rewrite_links(b.as_bytes(), T, "http://gw/v2/web").is_none(),
                "{b}"
            );
        }
    }

    #[test]
    fn rewrites_every_href_value_however_spaced_and_ordered() {
        let b = format!(
            "{{\"links\": [{{\"rel\": \"self\", \"href\" :\n\t\"https://h/v2/{T}/servers/x\"}}]}}"
        );
        let out = String::from_utf8(rewrite_links(b.as_bytes(), T, "https://gw/v2/web").unwrap())
            .unwrap();
        assert_eq!(
            out,
            "{\"links\": [{\"rel\": \"self\", \"href\" :\n\t\"https://gw/v2/web/servers/x\"}]}"
        );
    }

    #[test]
    fn rewrites_links_behind_a_path_prefix_and_before_a_query() {
        let b = format!(
            r#"[{{"href":"https://h:8774/compute/v2/{T}/servers/x"}},{{"href":"http://h/{T}?limit=1"}},{{"href":"https://h/v2/{T}#f"}},{{"href":"https://h/v2/{T}/x\/y"}},{{"href":"https://h v/{T}/x"}},{{"href":"https://h/x?t=/{T}/"}}]"#
        );
        let out = String::from_utf8(rewrite_links(b.as_bytes(), T, "https://gw/v2/web").unwrap())
            .unwrap();
        assert_eq!(
            out,
            format!(
                r#"[{{"href":"https://gw/v2/web/servers/x"}},{{"href":"https://gw/v2/web?limit=1"}},{{"href":"https://gw/v2/web#f"}},{{"href":"https://gw/v2/web/x\/y"}},{{"href":"https://h v/{T}/x"}},{{"href":"https://h/x?t=/{T}/"}}]"#
            ),
            "a string spaced before the tenant is not a plain URL and stays as it is; \
             what follows the tenant is copied as it is"
        );
    }

    #[test]
    fn a_link_like_an_earlier_one_is_rewritten_only_where_its_tenant_segment_ends() {
        let hrefs = |links: &[&str]| {
            let links: Vec<String> = links
                .iter()
                .map(|l| format!(r#"{{"href":"{}"}}"#, l.replace("{T}", T)))
                .collect();
            format!("[{}]", links.join(","))
        };
        let b = hrefs(&[
            "https://h/v2/{T}/a",
            "https://h/v2/{T}x/b",
            "https://h/v2/{T}?c",
            "https://h/v2/{T}",
            "https://h2/v2/{T}/d",
            "https://h/v2/{T}/e",
            "https://h/{T}/f",
            "https://h/v2/{T}/g",
            "https://h/{T}x",
            "https://h/{T}#h",
        ]);
        let out = String::from_utf8(rewrite_links(b.as_bytes(), T, "https://gw/v2/web").unwrap())
            .unwrap();
        assert_eq!(
            out,
            hrefs(&[
                "https://gw/v2/web/a",
                "https://h/v2/{T}x/b",
                "https://gw/v2/web?c",
                "https://gw/v2/web",
                "https://gw/v2/web/d",
                "https://gw/v2/web/e",
                "https://gw/v2/web/f",
                "https://gw/v2/web/g",
                "https://h/{T}x",
                "https://gw/v2/web#h",
            ])
        );
    }

    /// [`rewrite_links`] without the comparison with known link heads: every
    /// link's segments scanned.
    fn rewrite_links_by_scanning(body: &[u8], tenant: &str, base: &str) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        let mut copied_up_to = 0;
        for separator in memchr::memmem::find_iter(body, "://") {
            let Some(url_start) = url_start(body, separator) else {
                continue;
            };
            if url_start < copied_up_to {
                continue;
            }
            let after_scheme = separator + 3;
            let Some(end) = tenant_segment_end(&body[after_scheme..], tenant.as_bytes()) else {
                continue;
            };
            let buf = out.get_or_insert_with(Vec::new);
            buf.extend_from_slice(&body[copied_up_to..url_start]);
            buf.extend_from_slice(base.as_bytes());
            copied_up_to = after_scheme + end;
        }
        out.map(|mut buf| {
            buf.extend_from_slice(&body[copied_up_to..]);
            buf
        })
    }

    proptest::proptest! {
        #[test]
        fn comparing_with_known_link_heads_answers_as_scanning_does(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "\"https://", "\"http://", "h", "h2:80", "/", "/v2", "/6cdebe3eb0094910bc41f1d42ebe4cb7",
                    "x", "?", "#", " ", "\\", "\"", ",", ":", "://",
                    "\"href\":", "\"href\": ",
                    // Whole link heads, so that most bodies hold several.
                    "\"href\":\"https://h/v2/6cdebe3eb0094910bc41f1d42ebe4cb7",
                    "\"href\":\"https://h/6cdebe3eb0094910bc41f1d42ebe4cb7",
                    "\"href\": \"http://h2:80/v2/6cdebe3eb0094910bc41f1d42ebe4cb7",
                ]),
                0..60,
            )
        ) {
            let body = parts.concat();
            proptest::prop_assert_eq!(
                rewrite_links(body.as_bytes(), T, "https://gw/v2/web"),
                rewrite_links_by_scanning(body.as_bytes(), T, "https://gw/v2/web"),
                "{}", body
            );
        }

        /// Both variants of the one-byte search (the portable one runs on
        /// CPUs without AVX2 only) find what `memchr` finds, at any length
        /// and alignment.
        #[test]
        fn each_byte_search_finds_what_memchr_finds(
            // Needles sparse enough that most searches run past the first
            // 32 bytes, through the aligned and unrolled loops and the tail,
            // and some find nothing.
            haystack in proptest::collection::vec(
                proptest::prop_oneof![
                    60 => proptest::strategy::Just(b'a'),
                    1 => proptest::sample::select(b"/\"".to_vec()),
                ],
                0..600,
            ),
            start in 0usize..40,
            needle in proptest::sample::select(b"/\"".to_vec()),
        ) {
            let haystack = &haystack[start.min(haystack.len())..];
            let expected = memchr::memchr(needle, haystack);
            proptest::prop_assert_eq!(ByteSearch::Any(needle).find(haystack), expected);
            proptest::prop_assert_eq!(ByteSearch::new(needle).find(haystack), expected);
        }

        /// A tenant that overlaps itself ("abab" in "ababab") and occurs in
        /// hosts and in parts of segments.
        #[test]
        fn an_overlapping_tenant_is_rewritten_as_scanning_does(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "\"https://", "\"http://", "\"http:/", "\"", "ab", "aba", "abab", "b", "/", "/v2",
                    "?", "#", " ", "\\", ":", "://", "\"https://abab/", "\"http://h/abab",
                    "\"href\":", "\"href\":\"https://abab/", "\"href\":\"http://h/abab",
                ]),
                0..60,
            )
        ) {
            let body = parts.concat();
            proptest::prop_assert_eq!(
                rewrite_links(body.as_bytes(), "abab", "https://gw/v2/web"),
                rewrite_links_by_scanning(body.as_bytes(), "abab", "https://gw/v2/web"),
                "{}", body
            );
        }
    }

    #[test]
    fn public_base_is_the_configured_url_or_a_plausible_host_then_the_tail() {
        let mut h = HeaderMap::new();
        let tail = ["/v2/", "web"];
        assert_eq!(
            public_base(Some("https://gw.example"), "http", &h, None, &tail),
            "https://gw.example/v2/web"
        );
        assert_eq!(
            public_base(None, "http", &h, Some("h2.example:8443"), &[]),
            "http://h2.example:8443"
        );
        assert_eq!(
            public_base(None, "http", &h, None, &tail),
            "http://localhost/v2/web"
        );
        h.insert(header::HOST, HeaderValue::from_static("gw.internal:8080"));
        assert_eq!(
            public_base(None, "https", &h, None, &tail),
            "https://gw.internal:8080/v2/web"
        );
        h.insert(header::HOST, HeaderValue::from_static("evil.example/x?"));
        assert_eq!(
            public_base(None, "https", &h, None, &tail),
            "https://localhost/v2/web"
        );
    }

    #[test]
    fn rewrites_location_header() {
        let loc = format!("https://kr1/v2/{T}/images/img-1");
        assert_eq!(
            rewrite_location(&loc, T, "https://gw/v2/web").as_deref(),
            Some("https://gw/v2/web/images/img-1")
        );
    }

    #[test]
    fn caller_credentials_and_hop_by_hop_headers_are_not_forwarded() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer jwt"));
        h.insert("x-auth-token", HeaderValue::from_static("jwt"));
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-custom-hop"),
        );
        h.insert("x-custom-hop", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert(
            "openstack-api-version",
            HeaderValue::from_static("compute 2.47"),
        );
        h.insert(
            "x-openstack-nova-api-version",
            HeaderValue::from_static("2.47"),
        );
        h.insert("content-type", HeaderValue::from_static("application/json"));
        let out = upstream_request_headers(&h, true);
        for gone in [
            "authorization",
            "x-auth-token",
            "connection",
            "x-custom-hop",
            "te",
        ] {
            assert!(!out.contains_key(gone), "{gone}");
        }
        for kept in [
            "openstack-api-version",
            "x-openstack-nova-api-version",
            "content-type",
        ] {
            assert!(out.contains_key(kept), "{kept}");
        }
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_leave_the_answer() {
        let mut h = HeaderMap::new();
        h.append(
            "connection",
            HeaderValue::from_static("keep-alive, X-Custom-Hop"),
        );
        h.append("connection", HeaderValue::from_static("x-second"));
        h.insert("x-custom-hop", HeaderValue::from_static("1"));
        h.insert("x-second", HeaderValue::from_static("2"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("x-custom", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-custom"]);
    }

    #[test]
    fn every_fixed_hop_by_hop_header_leaves_the_answer_however_many() {
        // Nine of them, with only `keep-alive` in `Connection`: more than
        // one batch of the stack's four.
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive"));
        for name in [
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "keep-alive",
            "proxy-connection",
        ] {
            h.insert(name, HeaderValue::from_static("x"));
        }
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("x-keep-alive", HeaderValue::from_static("kept"));
        h.insert("date", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "date", "x-keep-alive"]);
    }

    #[test]
    fn exactly_the_allowed_caller_headers_go_upstream() {
        let allowed = [
            "accept",
            "accept-language",
            "user-agent",
            "openstack-api-version",
            "x-openstack-nova-api-version",
            "x-openstack-request-id",
        ];
        let refused = [
            "accept-encoding",
            "content-length",
            "x-openstack-request-ids",
            "openstack-api-versions",
            "x-roles",
            "cookie",
            "host",
        ];
        let mut h = HeaderMap::new();
        for name in allowed.iter().chain(&refused) {
            // Sent in upper case: names are case-insensitive.
            let upper = HeaderName::from_bytes(name.to_ascii_uppercase().as_bytes()).unwrap();
            h.insert(upper, HeaderValue::from_static("v"));
        }
        // No judged body: no `Content-Type` either (the gateway's to set).
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        let out = upstream_request_headers(&h, false);
        let mut sent: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        sent.sort_unstable();
        let mut want = allowed.to_vec();
        want.sort_unstable();
        assert_eq!(sent, want);
    }

    #[test]
    fn content_type_follows_the_judged_body() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        assert_eq!(
            upstream_request_headers(&h, true)["content-type"],
            "application/json"
        );
        assert!(!upstream_request_headers(&h, false).contains_key("content-type"));
    }

    #[test]
    fn host_header_is_checked_before_it_goes_into_links() {
        assert!(is_plausible_host("gw.example.com:8080"));
        assert!(is_plausible_host("[::1]:8080"));
        assert!(!is_plausible_host("evil.com/\"><script>"));
        assert!(!is_plausible_host(""));
    }

    #[test]
    fn version_documents_point_at_the_gateway() {
        let v = versions_document("https://gw");
        assert_eq!(v["versions"][0]["links"][0]["href"], "https://gw/v2/");
        assert_eq!(v["versions"][0]["links"][0]["rel"], "self");
        let v = version_document("https://gw");
        assert_eq!(v["version"]["id"], "v2.0");
        assert!(v["version"]["min_version"].is_string());
    }
}
