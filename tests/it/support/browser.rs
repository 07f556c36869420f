//! A real headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`,
//! installed by `scripts/setup-browser`): one `chromedriver` process per browser, on a free
//! port, killed with it.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};

use super::eventually;

/// How long a page may take to show what a test waits for.
pub const PAGE_WAIT: Duration = Duration::from_secs(30);

pub struct Browser {
    pub client: Client,
    driver: Child,
    /// Where screenshots go (`target/screenshots/`).
    shots: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a `width`×`height` window.
    pub async fn start(width: u32, height: u32) -> Browser {
        Self::start_with(width, height, &[]).await
    }

    /// [`Browser::start`] with more Chromium flags (`--force-dark-mode`).
    pub async fn start_with(width: u32, height: u32, extra: &[&str]) -> Browser {
        let driver_bin = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let chromium = std::env::var("CHROMIUM_BIN").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let port = free_port();
        // Its own process group: the Chromium it starts goes with it, even when a test panics.
        let driver = Command::new(&driver_bin)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {driver_bin} ({e}); scripts/setup-browser installs it")
            });
        let url = format!("http://127.0.0.1:{port}");
        eventually(
            Duration::from_secs(20),
            "chromedriver to listen",
            || async {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        let mut args: Vec<String> = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--lang=en-US",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.push(format!("--window-size={width},{height}"));
        args.extend(extra.iter().map(|a| a.to_string()));
        let caps: serde_json::Map<String, serde_json::Value> =
            serde_json::from_value(serde_json::json!({
                "browserName": "chrome",
                "goog:chromeOptions": { "binary": chromium, "args": args },
            }))
            .unwrap();
        let client = ClientBuilder::rustls()
            .expect("rustls connector")
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a WebDriver session");
        let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            client,
            driver,
            shots,
        }
    }

    /// Logs in at `base` with `token`.
    pub async fn login(&self, base: &str, token: &str) {
        self.goto(&format!("{base}/ui/login")).await;
        self.text_of("#token").await;
        self.fill("#token", token).await;
        self.click_button("Log in").await;
        self.wait_text("h1", "Overview").await;
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    /// Waits until an element matching `css` exists; returns its text. A part of the page that
    /// is re-rendered live (a job's) may replace the element between finding and reading it:
    /// then it is found again.
    pub async fn text_of(&self, css: &str) -> String {
        eventually(PAGE_WAIT, &format!("an element {css:?}"), || async {
            let el = self.client.find(Locator::Css(css)).await.ok()?;
            el.text().await.ok()
        })
        .await
    }

    /// Waits until the text of the first element matching `css` contains `want`.
    pub async fn wait_text(&self, css: &str, want: &str) -> String {
        eventually(PAGE_WAIT, &format!("{css:?} to show {want:?}"), || async {
            let el = self.client.find(Locator::Css(css)).await.ok()?;
            let text = el.text().await.ok()?;
            text.contains(want).then_some(text)
        })
        .await
    }

    /// The page's URL path and query.
    pub async fn path(&self) -> String {
        let u = self.client.current_url().await.unwrap();
        match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_string(),
        }
    }

    pub async fn fill(&self, css: &str, text: &str) {
        let el = self.client.find(Locator::Css(css)).await.unwrap();
        el.clear().await.unwrap();
        el.send_keys(text).await.unwrap();
    }

    pub async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css:?}: {e}"))
            .click()
            .await
            .unwrap();
    }

    /// Clicks the button whose text is `label` (the first one), finding it again when a live
    /// re-render replaced it before the click landed.
    pub async fn click_button(&self, label: &str) {
        let xpath = format!("//button[normalize-space(.)='{label}']");
        eventually(
            PAGE_WAIT,
            &format!("a button {label:?} to click"),
            || async {
                let el = self.client.find(Locator::XPath(&xpath)).await.ok()?;
                el.click().await.ok()
            },
        )
        .await
    }

    /// Writes a PNG of the page to `target/screenshots/<name>.png`, and to
    /// `docs/screenshots/<name>.png` when `UPDATE_DOCS_SCREENSHOTS` is set.
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), &png).unwrap();
        if std::env::var_os("UPDATE_DOCS_SCREENSHOTS").is_some() {
            let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots");
            std::fs::create_dir_all(&docs).unwrap();
            std::fs::write(docs.join(format!("{name}.png")), &png).unwrap();
        }
    }

    /// The value of the browser's cookie `name` (for requests made outside the browser).
    pub async fn cookie(&self, name: &str) -> Option<String> {
        self.client
            .get_named_cookie(name)
            .await
            .ok()
            .map(|c| c.value().to_string())
    }

    pub async fn close(self) {
        let _ = self.client.clone().close().await;
        // Drop ends the process group.
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: signalling the process group of our own child.
        unsafe {
            libc::killpg(self.driver.id() as i32, libc::SIGKILL);
        }
        let _ = self.driver.wait();
    }
}
