//! The dashboard in a real headless Chromium against a real `gorp start` with the script agent:
//! log in, follow a job's output live, cancel, create a channel and a schedule, answer an
//! approval, log out. Bad input: a wrong token, a missing or forged CSRF token, another site's
//! request, an unknown job, HTML in a prompt and in the agent's output. Screenshots of each page
//! go to `target/screenshots/` (and to `docs/screenshots/` with `UPDATE_DOCS_SCREENSHOTS=1`).

use std::time::Duration;

use fantoccini::Locator;
use reqwest::redirect::Policy;
use reqwest::StatusCode;

use crate::cli::{healthy, with_http, Env, API_TOKEN};
use crate::support::browser::{Browser, PAGE_WAIT};
use crate::support::eventually;

/// A channel's workspace, where the script agent's shell looks for its gate files.
fn workspace(env: &Env, channel: &str) -> std::path::PathBuf {
    env.dir.path().join("workspace").join(channel)
}

/// A prompt that waits for `gate` to exist in the workspace (the test opens it).
fn gate(name: &str) -> String {
    format!("@sh while [ ! -e {name} ]; do sleep 0.02; done; echo {name} open")
}

async fn job_state(env: &Env, id: &str) -> String {
    let store = env.store().await;
    let s = store.job_get(id).await.unwrap().unwrap().state.to_string();
    store.close().await;
    s
}

#[tokio::test]
async fn the_dashboard_in_a_real_browser() {
    let env = Env::new();
    let base = with_http(&env);
    let _server = env.start();
    healthy(&base).await;
    let b = Browser::start(1280, 900).await;

    // Not signed in: every page sends the browser to the login form.
    b.goto(&format!("{base}/ui/jobs")).await;
    b.text_of("form input[name=token]").await;
    assert_eq!(b.path().await, "/ui/login?next=%2Fui%2Fjobs");
    b.screenshot("login").await;
    // A wrong token is refused.
    b.fill("#token", "not-the-token-at-all").await;
    b.click_button("Log in").await;
    b.wait_text("p.flash", "not one of the API tokens").await;
    // The right one opens the page asked for.
    b.fill("#token", API_TOKEN).await;
    b.click_button("Log in").await;
    b.wait_text("h1", "Jobs").await;
    b.text_of("section.empty").await;

    // A channel, created from its form; the token is shown once.
    b.goto(&format!("{base}/ui/channels")).await;
    b.text_of("section.empty").await;
    b.fill("#name", "web").await;
    b.click_button("Create channel").await;
    b.wait_text("h1", "Channel web created").await;
    let token = b.text_of("#webhook-token").await;
    assert_eq!(token.trim().len(), 64, "{token}");
    std::fs::create_dir_all(workspace(&env, "web")).unwrap();

    // A job whose output grows while the page is open, without a reload.
    let prompt = format!(
        "{}\n@reply first part\n{}\n@reply second part",
        gate("gate1"),
        gate("gate2")
    );
    let id = env.ok(&["enqueue", "web", &prompt]).trim().to_string();
    b.goto(&format!("{base}/ui/jobs/{id}")).await;
    b.wait_text("#job-live .status", "running").await;
    let marker: String = b
        .client
        .execute(
            "window.gorpMarker = 'same page'; return window.gorpMarker;",
            vec![],
        )
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .into();
    std::fs::write(workspace(&env, "web").join("gate1"), "").unwrap();
    b.wait_text("#job-live .output", "first part").await;
    let live = b.text_of("#job-live .output").await;
    assert!(!live.contains("second part"), "{live}");
    std::fs::write(workspace(&env, "web").join("gate2"), "").unwrap();
    b.wait_text("#job-live .output", "second part").await;
    b.wait_text("#job-live .status", "succeeded").await;
    let still: serde_json::Value = b
        .client
        .execute("return window.gorpMarker;", vec![])
        .await
        .unwrap();
    assert_eq!(
        still.as_str(),
        Some(marker.as_str()),
        "followed live, not reloaded"
    );
    b.screenshot("job").await;

    // Cancel a running job and see it end cancelled.
    let id = env
        .ok(&["enqueue", "web", "@reply started\n@hang"])
        .trim()
        .to_string();
    b.goto(&format!("{base}/ui/jobs/{id}")).await;
    b.wait_text("#job-live .output", "started").await;
    b.click_button("Cancel job").await;
    b.wait_text("#job-live .status", "cancelled").await;
    assert_eq!(job_state(&env, &id).await, "cancelled");

    // A schedule with the live preview of its next fire times.
    b.goto(&format!("{base}/ui/schedules")).await;
    b.fill("#timezone", "UTC").await;
    b.fill("#when", "0 9 * * 1-5").await;
    let preview = b.wait_text("#when-preview", "Next in UTC").await;
    assert_eq!(
        preview.matches("09:00:00").count(),
        5,
        "five weekday mornings: {preview}"
    );
    b.fill("#when", "every tuesday").await;
    b.wait_text("#when-preview", "invalid cron expression")
        .await;
    b.fill("#when", "*/30 * * * *").await;
    b.wait_text("#when-preview", "Next in UTC").await;
    b.fill("#prompt", "@reply scheduled").await;
    b.click_button("Add schedule").await;
    b.wait_text("p.flash", "Schedule 1 added.").await;
    b.text_of("table td code").await;
    b.screenshot("schedules").await;

    // An approval: the channel asks, the page decides.
    b.goto(&format!("{base}/ui/channels/web")).await;
    let select = b
        .client
        .find(Locator::Css("#permission_policy"))
        .await
        .unwrap();
    select.select_by_value("ask").await.unwrap();
    b.click_button("Save").await;
    b.wait_text("p.flash", "Saved.").await;
    b.screenshot("channel").await;
    // Its idle agent stops, and warms again on request.
    b.click_button("Stop agent").await;
    b.wait_text("p.flash", "Agent stopped.").await;
    b.click_button("Warm now").await;
    b.wait_text("p.flash", "Starting the agent").await;
    eventually(PAGE_WAIT, "the agent to be warm again", || async {
        b.client.refresh().await.ok()?;
        let el = b.client.find(Locator::Css("span.warm")).await.ok()?;
        (el.text().await.ok()? == "warm").then_some(())
    })
    .await;
    // A new webhook token, shown once, and the old one refused.
    b.click_button("Rotate token").await;
    b.wait_text("h1", "New token for web").await;
    let rotated = b.text_of("#webhook-token").await;
    assert_ne!(rotated.trim(), token.trim());
    let hook = b.text_of("section.token pre:last-of-type").await;
    let hook_url = hook.split_whitespace().last().unwrap().to_string();
    let post = |t: String| {
        let url = hook_url.clone();
        async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(t.trim())
                .json(&serde_json::json!({ "prompt": "@reply hooked" }))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(post(token.clone()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(post(rotated.clone()).await, StatusCode::ACCEPTED);
    b.goto(&format!("{base}/ui/channels/web")).await;
    let id = env
        .ok(&[
            "enqueue",
            "web",
            "@permission run the tests\n@reply allowed and done",
        ])
        .trim()
        .to_string();
    b.goto(&format!("{base}/ui/approvals")).await;
    eventually(PAGE_WAIT, "the request to show", || async {
        b.client.refresh().await.ok()?;
        let el = b.client.find(Locator::Css("article.approval")).await.ok()?;
        el.text().await.ok().filter(|t| t.contains("run the tests"))
    })
    .await;
    b.screenshot("approvals").await;
    b.click_button("Allow once").await;
    b.wait_text("p.flash", "Decided: allowed.").await;
    eventually(PAGE_WAIT, "the allowed job to finish", || async {
        (job_state(&env, &id).await == "succeeded").then_some(())
    })
    .await;

    // HTML in a prompt and in the agent's output is shown as text, never run.
    let evil =
        "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>";
    let id = env
        .ok(&["enqueue", "web", &format!("{evil}\n@reply {evil} **bold**")])
        .trim()
        .to_string();
    b.goto(&format!("{base}/ui/jobs/{id}")).await;
    b.wait_text("#job-live .status", "succeeded").await;
    let prompt_text = b.text_of("pre.prompt").await;
    assert!(
        prompt_text.contains("<script>document.title='pwned'</script>"),
        "{prompt_text}"
    );
    b.wait_text("#job-live .output", "<img src=x").await;
    let found: serde_json::Value = b
        .client
        .execute(
            "return [document.title, document.querySelectorAll('main script, main img').length, \
             document.querySelectorAll('#job-live .output strong').length];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(found[0], "Job ".to_string() + &id[..13] + " · gorp");
    assert_eq!(found[1], 0, "no element from the input");
    assert_eq!(found[2], 1, "Markdown is still rendered");

    // Overview and the jobs list, for the record.
    b.goto(&format!("{base}/ui/")).await;
    b.wait_text("h1", "Overview").await;
    b.screenshot("overview").await;
    b.goto(&format!("{base}/ui/jobs")).await;
    b.text_of("table.jobs").await;
    b.screenshot("jobs").await;

    // Outside the browser, with its session cookie: no CSRF token, a forged one, or another
    // site's origin are refused and change nothing.
    let session = b.cookie("gorp_session").await.expect("session cookie");
    let http = reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap();
    let queued = env
        .ok(&["enqueue", "web", "@permission never decided"])
        .trim()
        .to_string();
    let cancel = format!("{base}/ui/jobs/{queued}/cancel");
    let cookie = format!("gorp_session={session}");
    for body in [
        "",
        "_csrf=forged0000000000000000000000000000000000000000000000000000000",
    ] {
        let resp = http
            .post(&cancel)
            .header("cookie", &cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{body}");
        assert!(resp.text().await.unwrap().contains("CSRF"));
    }
    let csrf: String = b
        .client
        .execute(
            "return document.querySelector('input[name=_csrf]').value;",
            vec![],
        )
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .into();
    let resp = http
        .post(&cancel)
        .header("cookie", &cookie)
        .header("origin", "http://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("_csrf={csrf}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_ne!(
        job_state(&env, &queued).await,
        "cancelled",
        "nothing changed"
    );

    // An unknown job is a page that says so.
    b.goto(&format!(
        "{base}/ui/jobs/0190a5d2-0000-7000-8000-000000000000"
    ))
    .await;
    b.wait_text("h1", "404").await;
    b.wait_text("p.error-text", "no job").await;

    // Log out: the browser is sent to the login form, and the old cookie opens nothing.
    b.goto(&format!("{base}/ui/")).await;
    b.click_button("Log out").await;
    b.text_of("form input[name=token]").await;
    b.goto(&format!("{base}/ui/jobs")).await;
    b.text_of("form input[name=token]").await;
    let resp = http
        .get(format!("{base}/ui/jobs"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert!(resp.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with("/ui/login"));
    b.close().await;
}

#[tokio::test]
async fn the_dashboard_fits_a_phone_and_follows_a_dark_system_theme() {
    let env = Env::new();
    let base = with_http(&env);
    let _server = env.start();
    healthy(&base).await;
    env.ok(&["channels", "add", "phone"]);
    let id = env
        .ok(&[
            "enqueue",
            "phone",
            "@tool-call Read README.md\n@reply a **short** answer",
        ])
        .trim()
        .to_string();
    let b = Browser::start_with(390, 844, &["--force-dark-mode"]).await;
    b.login(&base, API_TOKEN).await;
    for (page, shot) in [
        ("/ui/".to_string(), "phone-overview"),
        (format!("/ui/jobs/{id}"), "phone-job"),
        ("/ui/jobs".to_string(), "phone-jobs"),
    ] {
        b.goto(&format!("{base}{page}")).await;
        b.text_of("main h1").await;
        if page.contains(&id) {
            b.wait_text("#job-live .status", "succeeded").await;
        }
        let fit: serde_json::Value = b
            .client
            .execute(
                "return [document.documentElement.scrollWidth, window.innerWidth, \
                 getComputedStyle(document.body).backgroundColor];",
                vec![],
            )
            .await
            .unwrap();
        assert!(
            fit[0].as_i64() <= fit[1].as_i64(),
            "{page}: the page is wider than the phone: {fit}"
        );
        assert_eq!(fit[2], "rgb(21, 23, 26)", "{page}: dark background");
        b.screenshot(shot).await;
    }
    b.close().await;
}

#[tokio::test]
async fn the_dashboard_is_off_without_api_tokens_and_its_pages_never_answer_with_data() {
    let env = Env::new();
    // `with_http` would add a token: a free port only.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = env.config_path();
    let config = std::fs::read_to_string(&path)
        .unwrap()
        .replace("port = 0", &format!("port = {port}"));
    std::fs::write(&path, config).unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let _server = env.start();
    healthy(&base).await;
    let http = reqwest::Client::builder()
        .redirect(Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for path in ["/ui/", "/ui/jobs", "/ui/login", "/ui/channels"] {
        let resp = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/html"), "{ct}");
        assert!(resp.text().await.unwrap().contains("the dashboard is off"));
    }
}
