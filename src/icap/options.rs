//! What an ICAP service says of itself in its OPTIONS response (RFC 3507 §4.10), and what it
//! means for one message: which methods it takes, how much to preview, which files it wants
//! whole, previewed or not at all.

use std::time::Duration;

use super::wire::Head;

/// A service's OPTIONS, as last probed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub methods: Vec<String>,
    /// Bytes to preview; `None`: the service takes no preview.
    pub preview: Option<usize>,
    pub istag: Option<String>,
    /// Connections the service accepts at once.
    pub max_connections: Option<usize>,
    /// How long these hold; `None`: until something fails.
    pub ttl: Option<Duration>,
    pub allow_204: bool,
    transfer_preview: Extensions,
    transfer_ignore: Extensions,
    transfer_complete: Extensions,
}

/// How a message with a given file extension is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transfer {
    /// With a preview of this many bytes.
    Preview(usize),
    /// Whole, without a preview.
    Complete,
    /// Not at all: the service does not want it.
    Ignore,
}

/// A `Transfer-*` list: extensions, or `*` for all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Extensions {
    all: bool,
    listed: Vec<String>,
}

impl Extensions {
    fn parse(value: Option<&str>) -> Self {
        let mut list = Self::default();
        for item in value.unwrap_or("").split(',').map(|e| e.trim().to_ascii_lowercase()).filter(|e| !e.is_empty()) {
            match item.as_str() {
                "*" => list.all = true,
                _ => list.listed.push(item),
            }
        }
        list
    }

    fn contains(&self, extension: Option<&str>) -> bool {
        extension.is_some_and(|e| self.listed.iter().any(|l| l.eq_ignore_ascii_case(e)))
    }
}

impl Options {
    /// Reads an OPTIONS response head.
    pub fn from_head(head: &Head) -> Result<Self, String> {
        if head.status != 200 {
            return Err(format!("OPTIONS answered {} {}", head.status, head.reason));
        }
        let methods: Vec<String> = head
            .get("methods")
            .unwrap_or("")
            .split(',')
            .map(|m| m.trim().to_ascii_uppercase())
            .filter(|m| !m.is_empty())
            .collect();
        if methods.is_empty() {
            return Err("OPTIONS names no Methods".into());
        }
        let number = |name: &str| head.get(name).and_then(|v| v.trim().parse::<u64>().ok());
        Ok(Self {
            methods,
            preview: number("preview").map(|n| n as usize),
            istag: head.get("istag").map(|t| t.trim_matches('"').to_string()),
            max_connections: number("max-connections").map(|n| n as usize).filter(|n| *n > 0),
            ttl: number("options-ttl").map(Duration::from_secs),
            allow_204: head.get("allow").is_some_and(|a| a.split(',').any(|v| v.trim() == "204")),
            transfer_preview: Extensions::parse(head.get("transfer-preview")),
            transfer_ignore: Extensions::parse(head.get("transfer-ignore")),
            transfer_complete: Extensions::parse(head.get("transfer-complete")),
        })
    }

    /// Whether the service takes `method` (`REQMOD`, `RESPMOD`).
    pub fn offers(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == method)
    }

    /// How a message whose resource has `extension` is sent. An extension listed explicitly
    /// wins over `*`; with no list saying anything, a preview if the service takes one.
    pub fn transfer(&self, extension: Option<&str>) -> Transfer {
        let preview = || self.preview.map_or(Transfer::Complete, Transfer::Preview);
        if self.transfer_ignore.contains(extension) {
            return Transfer::Ignore;
        }
        if self.transfer_complete.contains(extension) {
            return Transfer::Complete;
        }
        if self.transfer_preview.contains(extension) {
            return preview();
        }
        if self.transfer_ignore.all {
            return Transfer::Ignore;
        }
        if self.transfer_complete.all {
            return Transfer::Complete;
        }
        preview()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn head(text: &str) -> Head {
        super::super::wire::read_head(&mut tokio::io::BufReader::new(text.as_bytes())).await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn c_icap_options_are_understood() {
        let options = Options::from_head(
            &head(
                "ICAP/1.0 200 OK\r\nMethods: RESPMOD, REQMOD\r\nISTag: \"CI0001-x\"\r\nTransfer-Preview: *\r\n\
                 Options-TTL: 3600\r\nPreview: 1024\r\nAllow: 204\r\nMax-Connections: 8\r\n\r\n",
            )
            .await,
        )
        .unwrap();
        assert!(options.offers("RESPMOD") && options.offers("REQMOD"));
        assert_eq!(options.istag.as_deref(), Some("CI0001-x"));
        assert_eq!((options.preview, options.max_connections), (Some(1024), Some(8)));
        assert_eq!((options.ttl, options.allow_204), (Some(Duration::from_secs(3600)), true));
        assert_eq!(options.transfer(Some("exe")), Transfer::Preview(1024));
    }

    #[tokio::test]
    async fn transfer_lists_decide_per_extension() {
        let options = Options::from_head(
            &head(
                "ICAP/1.0 200 OK\r\nMethods: RESPMOD\r\nPreview: 10\r\nTransfer-Preview: html\r\n\
                 Transfer-Ignore: mp4, JPG\r\nTransfer-Complete: *\r\n\r\n",
            )
            .await,
        )
        .unwrap();
        assert_eq!(options.transfer(Some("mp4")), Transfer::Ignore);
        assert_eq!(options.transfer(Some("jpg")), Transfer::Ignore);
        assert_eq!(options.transfer(Some("html")), Transfer::Preview(10));
        assert_eq!(options.transfer(Some("exe")), Transfer::Complete);
        assert_eq!(options.transfer(None), Transfer::Complete);
        assert!(!options.offers("REQMOD"));
        let refused = Options::from_head(&head("ICAP/1.0 404 Not Found\r\n\r\n").await).unwrap_err();
        assert!(refused.contains("404"), "{refused}");
    }
}
