//! `ka serve --http`: the session's web page in a real browser (headless
//! Chromium driven over the DevTools protocol), its JSON, event stream,
//! metrics and token, with a real session over loopback; and the page with
//! a generated session of a thousand nodes.
//!
//! Screenshots are kept under `target/test-artefacts/web/`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ka_bin::cli::events::{SourceEventLine, SourceLine};
use ka_bin::cli::status::{NodeStatus, SessionStatus};
use ka_bin::web::{WebFeed, WebServer};
use ka_tests::{ka_bin, pseudo_random, read_text, require_tool, ChildGuard, Proc};
use serde_json::{json, Value};

/// Where screenshots are kept: `target/test-artefacts/web/`.
fn artefacts() -> PathBuf {
    let bin = ka_bin();
    let target = bin
        .parent()
        .and_then(Path::parent)
        .expect("ka lives in target/<profile>/");
    let dir = target.join("test-artefacts").join("web");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A headless Chromium, driven over its DevTools protocol: one page loaded
/// once and read as it changes, which shows updates arrive without a
/// reload. Killed by PID when dropped, its profile directory removed.
struct Browser {
    process: ChildGuard,
    _profile: tempfile::TempDir,
    page: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Drop for Browser {
    /// Asks Chromium to quit (SIGTERM, by PID), so it reaps its own helper
    /// processes; the guard kills it if it has not within 5 s.
    fn drop(&mut self) {
        let pid = self.process.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the PID of our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let _ = ka_tests::wait_timeout(&mut self.process.child, Duration::from_secs(5));
    }
}

impl Browser {
    fn start() -> Browser {
        let chromium = require_tool("chromium", "chromium");
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chromium)
            .args([
                "--headless",
                // Root (CI) cannot use Chromium's sandbox.
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1400,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting chromium");
        let stderr = child.stderr.take().unwrap();
        let guard = ChildGuard {
            child,
            what: "chromium".into(),
        };
        // Chromium says where its DevTools listen on its first lines.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let browser_url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium did not open its DevTools port within 30 s");
        let port: u16 = browser_url
            .trim_start_matches("ws://127.0.0.1:")
            .split('/')
            .next()
            .unwrap()
            .parse()
            .expect("a DevTools port");
        let deadline = Instant::now() + Duration::from_secs(20);
        let page_url = loop {
            let (_, body) = http_get(port, "/json/list", None);
            let targets: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let page = targets.as_array().and_then(|t| {
                t.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(String::from))
            });
            if let Some(url) = page {
                break url;
            }
            assert!(Instant::now() < deadline, "chromium shows no page: {body}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let (page, _) = tungstenite::connect(&page_url).expect("connecting to the page");
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = page.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        }
        Browser {
            process: guard,
            _profile: profile,
            page,
            next_id: 1,
        }
    }

    /// Calls a DevTools method and returns its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"id": id, "method": method, "params": params});
        self.page
            .send(tungstenite::Message::text(request.to_string()))
            .expect("sending to chromium");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "{method}: no answer in 30 s");
            let message = self.page.read().expect("reading from chromium");
            let Ok(text) = message.to_text() else {
                continue;
            };
            let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        self.wait_for(
            "document.readyState === 'complete'",
            Duration::from_secs(20),
        );
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
        r["result"]["value"].clone()
    }

    /// Waits until `condition` holds in the page, or fails with the page's
    /// state.
    fn wait_for(&mut self, condition: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.eval(condition) != Value::Bool(true) {
            if Instant::now() >= deadline {
                let body = self.eval("document.body ? document.body.outerHTML : ''");
                let text = body.as_str().unwrap_or("");
                panic!(
                    "the page did not reach `{condition}` within {timeout:?}; it shows:\n{}",
                    &text[..text.len().min(6000)]
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A screenshot of the window, kept as `name` among the artefacts.
    fn screenshot(&mut self, name: &str) -> PathBuf {
        use base64::Engine;
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("base64 screenshot");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let path = artefacts().join(name);
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
        path
    }

    /// A data attribute of the page's body, as a number.
    fn body_number(&mut self, key: &str) -> f64 {
        let v = self.eval(&format!("Number(document.body.dataset.{key} || 0)"));
        v.as_f64().unwrap_or_else(|| panic!("{key}: {v}"))
    }

    /// A node box's data attribute.
    fn node_data(&mut self, node: &str, key: &str) -> String {
        self.eval(&format!(
            "(document.querySelector('#chain .box[data-node=\"{node}\"]') || {{dataset: {{}}}}).dataset.{key} || ''"
        ))
        .as_str()
        .unwrap_or("")
        .to_string()
    }
}

/// A plain HTTP/1.1 GET to 127.0.0.1:`port`: (status, body).
fn http_get(port: u16, path: &str, header: Option<&str>) -> (u16, String) {
    http_request(port, "GET", path, header)
}

fn http_request(port: u16, method: &str, path: &str, header: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let extra = header.map_or(String::new(), |h| format!("{h}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n{extra}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    let _ = s.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // Chunked bodies (axum's default for streams): good enough to search.
    (status, body.to_string())
}

/// The event stream from its start until `enough` holds for what was read
/// (or the stream ends), as (event name, data) pairs.
fn sse_events(port: u16, enough: impl Fn(&[(String, Value)]) -> bool) -> Vec<(String, Value)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(s);
    let mut events = Vec::new();
    let mut name = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !enough(&events) {
        assert!(Instant::now() < deadline, "too few events: {events:?}");
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let line = line.trim_end();
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            events.push((name.clone(), serde_json::from_str(d).expect("JSON data")));
        }
    }
    events
}

/// `/metrics` as (name with labels, value) lines, checking every metric has
/// its TYPE line.
fn metrics(port: u16) -> Vec<(String, f64)> {
    let (status, body) = http_get(port, "/metrics", None);
    assert_eq!(status, 200, "{body}");
    let mut samples = Vec::new();
    for line in body.lines().filter(|l| l.starts_with("ka_")) {
        let (name, value) = line.rsplit_once(' ').unwrap();
        let metric = name.split('{').next().unwrap();
        assert!(
            body.contains(&format!("# TYPE {metric} ")),
            "{metric} has no TYPE"
        );
        samples.push((name.to_string(), value.parse().expect(line)));
    }
    samples
}

fn sample(samples: &[(String, f64)], name: &str) -> f64 {
    samples
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name} in {samples:?}"))
        .1
}

/// Waits for `proc`'s standard error to say where the page is; its port.
fn web_port(proc: &Proc) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let err = read_text(&proc.err);
        if let Some(port) = err
            .lines()
            .find_map(|l| l.split("web page at http://127.0.0.1:").nth(1))
        {
            return port
                .split('/')
                .next()
                .unwrap()
                .parse()
                .expect("a port number");
        }
        assert!(
            Instant::now() < deadline,
            "ka serve did not print its web page's address within 20 s:\n{err}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for `proc`'s standard error to name its session port.
fn session_port(proc: &Proc) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let err = read_text(&proc.err);
        if let Some(port) = err
            .lines()
            .find_map(|l| l.split("nodes on 127.0.0.1:").nth(1))
        {
            return port.trim().parse().expect("a port number");
        }
        assert!(
            Instant::now() < deadline,
            "ka serve did not listen within 20 s:\n{err}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_live_session_is_drawn_as_it_goes_and_a_killed_node_shown_dead() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    ka_tests::write_secret(&secret, 0x3eb ^ u64::from(std::process::id()));
    // 64 MiB at 6 MiB/s: about ten seconds of streaming.
    let image = dir.path().join("image.img");
    let f = std::fs::File::create(&image).unwrap();
    for i in 0..64u64 {
        f.write_all_at(&pseudo_random(1 << 20, i + 1), i << 20)
            .unwrap();
    }
    let state = dir.path().join("state");
    let (secret_s, image_s, state_s) = (
        secret.to_str().unwrap(),
        image.to_str().unwrap(),
        state.to_str().unwrap(),
    );
    let spool = dir.path().to_str().unwrap();
    let serve = Proc::start(
        dir.path(),
        "serve",
        &[
            "serve",
            "--nodes",
            "4",
            "--listen",
            "127.0.0.1:0",
            "--secret-file",
            secret_s,
            "--image",
            image_s,
            "--state-dir",
            state_s,
            "--spool-dir",
            spool,
            "--order",
            "n1,n2,n3,n4",
            "--max-rate",
            "6MiB",
            "--http",
            "127.0.0.1:0",
            "--http-linger",
            "2s",
            "--json",
        ],
    );
    let port = web_port(&serve);
    let server = format!("127.0.0.1:{}", session_port(&serve));
    eprintln!("web page: http://127.0.0.1:{port}/");

    let mut browser = Browser::start();
    browser.open(&format!("http://127.0.0.1:{port}/"));
    browser.wait_for(
        "document.body.dataset.state === 'waiting' && document.body.dataset.connected === 'yes'",
        Duration::from_secs(10),
    );
    // Marks this load: still there later means the page never reloaded.
    browser.eval("window.kaLoad = 'first'");
    browser.screenshot("1-waiting.png");

    let targets: Vec<PathBuf> = (1..=4)
        .map(|i| dir.path().join(format!("n{i}.img")))
        .collect();
    let mut nodes: Vec<Option<Proc>> = (1..=4)
        .map(|i| {
            let name = format!("n{i}");
            Some(Proc::start(
                dir.path(),
                &name,
                &[
                    "join",
                    "--server",
                    &server,
                    "--secret-file",
                    secret_s,
                    "--name",
                    &name,
                    "--target",
                    targets[i - 1].to_str().unwrap(),
                    "--state-dir",
                    state_s,
                    "--spool-dir",
                    spool,
                    "--wait",
                    "60s",
                ],
            ))
        })
        .collect();

    // Mid-stream: four boxes receiving, in chain order.
    browser.wait_for(
        "document.querySelectorAll('#chain .box.s-receiving').length === 4 \
         && Number(document.querySelector('#chain .box[data-node=\"n4\"]').dataset.bytes) > 0",
        Duration::from_secs(30),
    );
    let order = browser.eval(
        "Array.from(document.querySelectorAll('#chain .box[data-node]')).map(b => b.dataset.node + '<' + b.dataset.upstream).join(' ')",
    );
    assert_eq!(order, "n1<source n2<n1 n3<n2 n4<n3", "the chain as drawn");
    let applied_before = browser.body_number("applied");
    let bytes_before: u64 = browser.node_data("n4", "bytes").parse().unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let applied_after = browser.body_number("applied");
    let bytes_after: u64 = browser.node_data("n4", "bytes").parse().unwrap();
    assert!(
        applied_before > 1.0 && applied_after > applied_before,
        "SSE messages applied: {applied_before} then {applied_after}"
    );
    assert!(
        bytes_after > bytes_before,
        "n4's bytes on the page did not grow: {bytes_before} then {bytes_after}"
    );
    assert_eq!(browser.eval("window.kaLoad"), "first", "the page reloaded");
    let text = browser.eval("document.body.innerText").to_string();
    assert!(text.contains("ETA") && text.contains("/s"), "{text}");
    browser.screenshot("2-streaming.png");
    eprintln!(
        "live page: {applied_before} then {applied_after} messages applied, n4 at {bytes_before} then {bytes_after} bytes"
    );

    // The API beside the page, while it streams.
    let (status, body) = http_get(port, "/api/session", None);
    assert_eq!(status, 200, "{body}");
    let session: Value = serde_json::from_str(&body).expect(&body);
    assert_eq!(session["state"], "streaming", "{session}");
    assert_eq!(session["image_size"], 64 << 20);
    assert_eq!(session["image"], image_s);
    let api_nodes = session["nodes"].as_array().unwrap();
    let mut names: Vec<&str> = api_nodes
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["n1", "n2", "n3", "n4"]);
    for n in api_nodes {
        assert_eq!(n["state"], "receiving", "{n}");
        assert!(n["bytes"].as_u64().unwrap() > 0, "{n}");
        assert!(n.get("eta").is_some() && n.get("upstream").is_some(), "{n}");
    }
    let m = metrics(port);
    assert_eq!(
        sample(&m, "ka_session_state{session=\"ka\",state=\"streaming\"}"),
        1.0
    );
    assert_eq!(
        sample(&m, "ka_image_bytes{session=\"ka\"}"),
        (64 << 20) as f64
    );
    assert_eq!(
        sample(&m, "ka_nodes{session=\"ka\",state=\"receiving\"}"),
        4.0
    );
    for n in ["n1", "n2", "n3", "n4"] {
        let got = sample(
            &m,
            &format!("ka_node_received_bytes{{session=\"ka\",node=\"{n}\"}}"),
        );
        assert!(got > 0.0 && got <= (64 << 20) as f64, "{n}: {got}");
        sample(
            &m,
            &format!("ka_node_rate_bytes_per_second{{session=\"ka\",node=\"{n}\"}}"),
        );
        assert_eq!(
            sample(
                &m,
                &format!("ka_node_deaths_total{{session=\"ka\",node=\"{n}\"}}")
            ),
            0.0
        );
    }
    // A late client first gets a snapshot, then the events so far.
    // Nodes' log lines come interleaved with their joins, so the stream is
    // read until all four joins are in, not for a fixed number of events.
    let joins = |events: &[(String, Value)]| {
        events
            .iter()
            .filter(|(name, data)| name == "event" && data["event"] == "joined")
            .count()
    };
    let events = sse_events(port, |events| joins(events) >= 4);
    assert_eq!(events[0].0, "session", "{events:?}");
    assert_eq!(events[0].1["nodes"].as_array().unwrap().len(), 4);
    assert_eq!(joins(&events), 4, "{events:?}");

    // n2 killed: shown dead, n3 fed by n1.
    nodes[1].take().unwrap().kill9();
    browser.wait_for(
        "(document.querySelector('#chain .box[data-node=\"n2\"]') || {dataset: {}}).dataset.state === 'dead' \
         && document.querySelector('#chain .box[data-node=\"n3\"]').dataset.upstream === 'n1'",
        Duration::from_secs(20),
    );
    let timeline = browser.eval("document.getElementById('events').innerText");
    assert!(timeline.as_str().unwrap().contains("n2 dead"), "{timeline}");
    assert!(
        timeline.as_str().unwrap().contains("n3 now fed by n1"),
        "{timeline}"
    );
    browser.screenshot("3-n2-killed.png");

    // The end: the report, 3 OK and n2 KO.
    browser.wait_for(
        "document.body.dataset.report === 'shown'",
        Duration::from_secs(90),
    );
    assert_eq!(browser.body_number("reportOk"), 3.0);
    assert_eq!(browser.body_number("reportKo"), 1.0);
    let ko = browser.eval(
        "Array.from(document.querySelectorAll('#report tr.korow')).map(r => r.dataset.node).join(',')",
    );
    assert_eq!(ko, "n2");
    let line = browser.eval("document.getElementById('report-line').innerText");
    assert!(line.as_str().unwrap().starts_with("3/4 nodes OK"), "{line}");
    assert_eq!(browser.eval("window.kaLoad"), "first", "the page reloaded");
    // Released nodes keep their places; the lost one is out of the chain.
    let order = browser.eval(
        "Array.from(document.querySelectorAll('#chain .box[data-node]')).map(b => b.dataset.node + '<' + b.dataset.upstream).join(' ')",
    );
    assert_eq!(order, "n1<source n3<n1 n4<n3 n2<", "the chain at the end");
    browser.screenshot("4-report.png");
    eprintln!("screenshots in {}", artefacts().display());

    let (code, out, err) = serve.finish(Duration::from_secs(60));
    assert_ne!(code, 0, "a node was lost: not a full success\n{err}");
    let report = ka_tests::final_report(&out);
    assert_eq!(report.nodes.iter().filter(|n| n.ok).count(), 3, "{out}");
    for node in nodes.into_iter().flatten() {
        let (code, _, err) = node.finish(Duration::from_secs(60));
        assert_eq!(code, 0, "{err}");
    }
}

#[test]
fn the_page_needs_its_token_and_is_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    ka_tests::write_secret(&secret, 0x70c ^ u64::from(std::process::id()));
    let image = dir.path().join("image.img");
    std::fs::write(&image, pseudo_random(1 << 20, 9)).unwrap();
    let state = dir.path().join("state");
    let logs = dir.path().join("node-logs");
    let base = |http: &str| -> Vec<String> {
        [
            "serve",
            "--nodes",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--secret-file",
            secret.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--log-dir",
            logs.to_str().unwrap(),
            "--http",
            http,
        ]
        .map(String::from)
        .to_vec()
    };

    // Reachable from elsewhere without a token: refused before anything.
    let args = base("0.0.0.0:0");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ka_tests::ka(&args);
    assert!(!out.status.success());
    let err = ka_tests::stderr(&out);
    assert!(err.contains("--http-token-file"), "{err}");

    let token_file = dir.path().join("web-token");
    let mut args = base("127.0.0.1:0");
    args.extend(["--http-token-file".into(), token_file.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let serve = Proc::start(dir.path(), "serve", &args);
    let port = web_port(&serve);
    let token = std::fs::read_to_string(&token_file).unwrap();
    let token = token.trim();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        read_text(&serve.err).contains(&format!("/?token={token}")),
        "the URL printed carries the token"
    );

    for path in ["/", "/api/session", "/metrics", "/api/events"] {
        let (status, body) = http_get(port, path, None);
        assert_eq!(status, 401, "{path}: {body}");
        assert!(body.contains("Authorization: Bearer"), "{body}");
    }
    let (status, _) = http_get(port, "/api/session?token=wrong-token-0123456789", None);
    assert_eq!(status, 401);
    let (status, _) = http_get(
        port,
        "/api/session",
        Some("Authorization: Bearer wrong-token-0123456789"),
    );
    assert_eq!(status, 401);
    let (status, body) = http_get(port, &format!("/api/session?token={token}"), None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"state\":\"waiting\""), "{body}");
    let bearer = format!("Authorization: Bearer {token}");
    let (status, body) = http_get(port, "/metrics", Some(&bearer));
    assert_eq!(status, 200, "{body}");
    let (status, page) = http_get(port, &format!("/?token={token}"), None);
    assert_eq!(status, 200);
    assert!(
        page.contains("EventSource") && !page.contains("http://") && !page.contains("https://"),
        "the page is whole and asks no other host"
    );
    for method in ["POST", "PUT", "DELETE"] {
        let (status, _) = http_request(port, method, "/api/session", Some(&bearer));
        assert_eq!(status, 405, "{method}");
    }
    drop(serve);
}

/// A generated session of `count` nodes in one chain, each `step` bytes
/// further than the last snapshot.
fn generated(count: usize, tick: u64, tail: Option<usize>) -> SessionStatus {
    let mut status = SessionStatus::empty("big", Some("/srv/golden.img".into()));
    status.state = "streaming".into();
    status.image_size = Some(8 << 30);
    status.seconds = tick as f64 / 10.0;
    let mut order: Vec<usize> = (0..count).collect();
    if let Some(t) = tail {
        order.retain(|&i| i != t);
        order.push(t);
    }
    for (position, &i) in order.iter().enumerate() {
        status.nodes.push(NodeStatus {
            name: format!("node{i:04}"),
            id: i as u32 + 1,
            state: if i % 97 == 5 { "dead" } else { "receiving" }.into(),
            bytes: tick * (1 << 20) + (i as u64 % 7) * 4096,
            rate: 10.0 * (1 << 20) as f64,
            upstream: Some(if position == 0 {
                "source".to_string()
            } else {
                format!("node{:04}", order[position - 1])
            }),
            reason: String::new(),
            eta: Some(800.0),
            deaths: 0,
        });
    }
    status
}

#[test]
fn a_thousand_nodes_are_drawn_and_updated_ten_times_a_second() {
    const NODES: usize = 1000;
    let feed = WebFeed::new(SessionStatus::empty("big", None));
    let server = WebServer::bind("127.0.0.1:0".parse().unwrap(), None, feed.clone()).unwrap();
    let port = server.local_addr().unwrap().port();
    let _serving = server.serve_in_background().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // The session's side: a snapshot ten times a second, an event each,
    // and the chain reordered once (a node moved to the tail).
    let publisher = {
        let (feed, stop) = (feed.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut tick = 1u64;
            while !stop.load(Ordering::Relaxed) {
                let tail = (tick >= 30).then_some(3);
                feed.session(generated(NODES, tick, tail));
                feed.event(SourceEventLine {
                    event: if tick == 30 {
                        SourceLine::Slow {
                            node: "node0003".into(),
                            id: 4,
                            policy: "move_to_tail".into(),
                        }
                    } else {
                        SourceLine::ImageDone { size: tick }
                    },
                    t: tick as f64 / 10.0,
                });
                tick += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let mut browser = Browser::start();
    browser.open(&format!("http://127.0.0.1:{port}/"));
    browser.wait_for(
        &format!("document.querySelectorAll('#chain .box[data-node]').length === {NODES}"),
        Duration::from_secs(30),
    );
    let applied = browser.body_number("applied");
    let bytes: u64 = browser.node_data("node0999", "bytes").parse().unwrap();
    std::thread::sleep(Duration::from_secs(4));
    // Moved to the tail at tick 30: the last box, marked.
    browser.wait_for(
        "document.querySelector('#chain .box[data-node]:last-child').dataset.node === 'node0003' \
         && document.querySelector('#chain .box[data-node=\"node0003\"]').classList.contains('tail')",
        Duration::from_secs(10),
    );
    let applied_later = browser.body_number("applied");
    let bytes_later: u64 = browser.node_data("node0999", "bytes").parse().unwrap();
    let redraws = browser.body_number("redraws");
    let max_ms = browser.body_number("maxRenderMs");
    let last_ms = browser.body_number("renderMs");
    // The last redraw that rebuilt the chain (the move to the tail).
    let full_ms = browser.body_number("fullRenderMs");
    let dead = browser.eval("document.querySelectorAll('#chain .box.s-dead').length");
    browser.screenshot("5-thousand-nodes.png");
    stop.store(true, Ordering::Relaxed);
    publisher.join().unwrap();
    eprintln!(
        "1000 nodes: {applied} then {applied_later} messages applied, {redraws} redraws, \
         slowest redraw {max_ms} ms, last full redraw {full_ms} ms, last {last_ms} ms"
    );
    assert!(full_ms > 0.0, "no full redraw measured");
    assert_eq!(
        browser.body_number("nodes"),
        NODES as f64,
        "every node drawn"
    );
    assert_eq!(dead, json!((0..NODES).filter(|i| i % 97 == 5).count()));
    assert!(
        applied_later >= applied + 40.0,
        "{applied} then {applied_later}"
    );
    assert!(bytes_later > bytes, "{bytes} then {bytes_later}");
    // Throttled: at most about four redraws a second for ten messages.
    assert!(redraws > 2.0, "{redraws} redraws");
    assert!(
        redraws <= applied_later / 2.0,
        "{redraws} redraws for {applied_later} messages: not throttled"
    );
    assert!(max_ms < 1000.0, "a redraw took {max_ms} ms");
}
