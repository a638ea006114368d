//! The browser for the web page's tests: chromedriver on a free port, headless Chromium
//! through it, and waits for what the page shows.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client as Browser, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use lockguard_tests::guard_support::wait_for;

use super::WAIT;

/// A chromedriver process (in its own process group, with the Chromium it starts), killed
/// on drop.
pub(crate) struct Chromedriver {
    child: Child,
    url: String,
    /// Its log, kept when the test fails.
    log: PathBuf,
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // The whole group: chromedriver and the browser it started.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's process group.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// Finds `name` on `PATH` (or the path in `$env_var`), failing with the package to install.
fn tool(name: &str, env_var: &str, package: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{env_var}={} is not a file: install the Debian package {package} or fix {env_var}",
            path.display()
        );
        return path;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "the web page tests need {name}, which is not on PATH: install the Debian \
                 package {package} (apt-get install chromium chromium-driver; .ci/run does), \
                 or set {env_var}"
            )
        })
}

impl Chromedriver {
    /// Starts chromedriver on a free port and waits until it accepts connections.
    pub(crate) async fn start() -> Chromedriver {
        let driver = tool("chromedriver", "CHROMEDRIVER", "chromium-driver");
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            listener.local_addr().expect("its address").port()
        };
        let log = output_dir().join(format!("chromedriver-{port}.log"));
        let mut command = Command::new(&driver);
        command
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", driver.display()));
        let chromedriver = Chromedriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_for(WAIT, "chromedriver to listen", || async move {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
        chromedriver
    }

    /// A new headless Chromium session.
    pub(crate) async fn browser(&self) -> Browser {
        let chromium = tool("chromium", "CHROMIUM", "chromium");
        let capabilities = serde_json::json!({
            "goog:chromeOptions": {
                "binary": chromium,
                // As root (CI) Chromium needs --no-sandbox; /dev/shm is small in containers.
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    "--window-size=1400,1000",
                ],
            }
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object");
        };
        ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("a Chromium session from chromedriver: {e}"))
    }
}

/// Where screenshots and logs go: `target/web-ui/`.
fn output_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("web-ui");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Waits for an element matching `css` (the page redraws on its own timer).
pub(crate) async fn shown(
    browser: &Browser,
    css: &str,
    within: Duration,
) -> fantoccini::elements::Element {
    match browser
        .wait()
        .at_most(within)
        .every(Duration::from_millis(50))
        .for_element(Locator::Css(css))
        .await
    {
        Ok(element) => element,
        Err(e) => {
            let status = page_text(browser, "#status").await;
            panic!(
                "the page did not show {css} within {within:?} ({e}); its status line: {status:?}"
            )
        }
    }
}

pub(crate) async fn page_text(browser: &Browser, css: &str) -> String {
    match browser.find(Locator::Css(css)).await {
        Ok(element) => element.text().await.unwrap_or_default(),
        Err(e) => format!("<{css} not found: {e}>"),
    }
}

/// Starts chromedriver and a headless Chromium, and opens `url` in it. The driver must outlive
/// the browser: keep both.
pub(crate) async fn open_page(url: &str) -> (Chromedriver, Browser) {
    let driver = Chromedriver::start().await;
    let browser = driver.browser().await;
    browser.goto(url).await.expect("open the page");
    (driver, browser)
}

/// Saves a screenshot of the page as `target/web-ui/<name>`.
pub(crate) async fn save_screenshot(browser: &Browser, name: &str) {
    let screenshot = browser.screenshot().await.expect("a screenshot");
    let path = output_dir().join(name);
    std::fs::write(&path, screenshot).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Types `token` into the page's token field and presses Use, as the operator does.
pub(crate) async fn use_token(browser: &Browser, token: &str) {
    browser
        .find(Locator::Id("token"))
        .await
        .expect("the token field")
        .send_keys(token)
        .await
        .expect("type the token");
    browser
        .find(Locator::Id("token-use"))
        .await
        .expect("the Use button")
        .click()
        .await
        .expect("click Use");
}
