//! The supervisor in this process, with real child processes (`sleep`, `sh`
//! crash loops), real dns and lb components, a real Consul and a real browser:
//! restarts and backoff, the admin API and its actions, `/metrics` parsed line
//! by line, the token rule, and the status page in headless Chromium.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use wayfinder::supervisor::unit::UnitState;

use crate::harness::{
    Consul, Up, consul_section, dig_until, eventually, free_port, http_client, require, tagged_backend, wait_routed,
};

/// The lb's view (Consul connection, routed services), for failure messages.
fn lb_routes(up: &Up) -> String {
    match up
        .state
        .component_of::<wayfinder::lb::component::Lb>()
        .and_then(|lb| lb.state())
    {
        None => format!("lb not started: {:?}", up.unit("lb")),
        Some(state) => {
            let status = wayfinder::lb::status::LbStatus::collect(&state);
            let names: Vec<&str> = status.routes.iter().map(|r| r.service.as_str()).collect();
            format!(
                "consul_ok={} changes={} routes={names:?}",
                status.consul_ok, status.changes
            )
        }
    }
}

/// Role variables that start no built-in unit: only the configured programs.
pub(crate) const PROGRAMS_ONLY: &[(&str, &str)] = &[
    ("START_CONSUL", "false"),
    ("START_DNS", "false"),
    ("START_LB", "false"),
    ("START_REGISTRATOR", "false"),
];

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; its state is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// A killed child is running again within a second; a crash loop backs off
/// (100, 200, 400, 800 ms) and ends `failed` after five starts; neither touches
/// the other program. `never` runs once; an admin restart revives a failed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_child_restarts_fast_crash_loop_backs_off_to_failed() {
    require("sleep");
    require("sh");
    let up = Up::start(
        "[[supervisor.program]]\nname = \"steady\"\ncommand = \"sleep\"\nargs = [\"1000\"]\n\
         [[supervisor.program]]\nname = \"crashy\"\ncommand = \"sh\"\nargs = [\"-c\", \"echo crashing; exit 3\"]\n\
         [[supervisor.program]]\nname = \"once\"\ncommand = \"sh\"\nargs = [\"-c\", \"exit 0\"]\nrestart = \"never\"\n\
         [[supervisor.program]]\nname = \"manual\"\ncommand = \"sleep\"\nargs = [\"1000\"]\nautostart = false\n",
        &[PROGRAMS_ONLY, &[("START_VPN", "false")]].concat(),
    )
    .await;
    let started = Instant::now();
    let steady = up
        .wait_unit("steady", Duration::from_secs(5), "running", |u| {
            u.state == UnitState::Running
        })
        .await;
    let pid = steady.pid.expect("a pid");
    assert!(alive(pid));

    // SIGKILL: back within a second, under a new pid.
    // SAFETY: kill(2) on the child the supervisor started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    let again = up
        .wait_unit("steady", Duration::from_secs(1), "restarted within 1 s", |u| {
            u.state == UnitState::Running && u.pid.is_some_and(|p| p != pid)
        })
        .await;
    assert!(killed.elapsed() < Duration::from_secs(1), "{:?}", killed.elapsed());
    assert_eq!(again.restarts, 1);
    assert!(
        again.last_exit.as_deref().is_some_and(|l| l.contains("signal 9")),
        "{again:?}"
    );
    assert!(!alive(pid), "the killed child was reaped");

    // The crash loop: five starts with growing pauses, then failed.
    let failed = up
        .wait_unit("crashy", Duration::from_secs(10), "marked failed", |u| {
            u.state == UnitState::Failed
        })
        .await;
    assert_eq!(failed.restarts, 4, "five starts in all: {failed:?}");
    assert_eq!(failed.last_exit.as_deref(), Some("exit status 3"));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(100 + 200 + 400 + 800),
        "backoff pauses add up to 1.5 s, took {took:?}"
    );
    // It stays failed (no more starts) and the others are untouched.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(up.unit("crashy").restarts, 4);
    assert_eq!(up.unit("crashy").state, UnitState::Failed);
    let steady_now = up.unit("steady");
    assert_eq!((steady_now.state, steady_now.pid), (UnitState::Running, again.pid));
    let once = up.unit("once");
    assert_eq!((once.state, once.restarts), (UnitState::Exited, 0), "{once:?}");

    // Readiness: the failed program is what `up` waits for; the one-shot that
    // ended well, the running one and the one not autostarted are not.
    let client = http_client();
    let resp = client
        .get(format!("http://{}/api/ready", up.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    let waiting = body["waiting_for"].as_array().cloned().unwrap_or_default();
    assert_eq!(waiting.len(), 1, "{body:#}");
    assert_eq!(waiting[0]["unit"], "crashy", "{body:#}");
    let why = waiting[0]["why"].as_str().unwrap_or_default();
    assert!(why.contains("failed") && why.contains("exit status 3"), "{body:#}");
    assert_eq!(body["ready"], false);

    // An admin restart gives a failed program a fresh start.
    let resp = client
        .post(format!("http://{}/api/units/crashy/restart", up.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    up.wait_unit("crashy", Duration::from_secs(3), "restarted by request", |u| {
        u.restarts >= 5
    })
    .await;

    // autostart = false: off until asked for.
    assert_eq!(up.unit("manual").state, UnitState::Off);
    let resp = client
        .post(format!("http://{}/api/units/manual/restart", up.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    up.wait_unit("manual", Duration::from_secs(3), "started by request", |u| {
        u.state == UnitState::Running && u.pid.is_some()
    })
    .await;

    // START_VPN=false: reported off with the reason, and not restartable.
    let vpn = up.unit("vpn");
    assert_eq!(vpn.state, UnitState::Off, "{vpn:?}");
    assert_eq!(vpn.why, "START_VPN=false", "{vpn:?}");
    let resp = client
        .post(format!("http://{}/api/units/vpn/restart", up.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);

    let steady_pid = again.pid.unwrap();
    up.stop().await;
    assert!(!alive(steady_pid), "stopped with the supervisor");
}

/// A program that ignores its stop signal is SIGKILLed after `stop_timeout`;
/// its background grandchild goes with its process group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stubborn_program_is_killed_after_stop_timeout_with_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("grandchild.pid");
    let script = format!(
        "trap '' TERM; sleep 1000 & echo $! > {}; while true; do sleep 0.1; done",
        pidfile.display()
    );
    let up = Up::start(
        &format!(
            "[[supervisor.program]]\nname = \"stubborn\"\ncommand = \"sh\"\nargs = [\"-c\", {script:?}]\n\
             stop_timeout = \"500ms\"\n"
        ),
        PROGRAMS_ONLY,
    )
    .await;
    let unit = up
        .wait_unit("stubborn", Duration::from_secs(5), "running", |u| {
            u.state == UnitState::Running
        })
        .await;
    eventually(Duration::from_secs(5), "grandchild pid written", || {
        std::fs::read_to_string(&pidfile).is_ok_and(|s| !s.trim().is_empty())
    })
    .await;
    let grandchild: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert!(alive(grandchild));
    let stopping = Instant::now();
    up.stop().await;
    let took = stopping.elapsed();
    assert!(took >= Duration::from_millis(500), "waited for stop_timeout: {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(!alive(unit.pid.unwrap()), "the program is gone");
    // The grandchild is re-parented to init when its shell dies; give init a moment.
    eventually(Duration::from_secs(2), "grandchild killed with the group", || {
        !alive(grandchild)
    })
    .await;
}

/// A process that left its program's group (setsid) and kept its stdout is
/// forwarded no longer than until the program's next start: the supervisor
/// then closes its end of the old pipe, so that process's writes fail (EPIPE)
/// instead of being read, by a task per run, for as long as it lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_of_a_process_that_left_the_group_is_let_go_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let (pidfile, marker) = (dir.path().join("escaped.pid"), dir.path().join("let-go"));
    let escaped = format!(
        "trap '' PIPE; echo $$ > {}; while echo tick; do sleep 0.1; done; echo > {}",
        pidfile.display(),
        marker.display()
    );
    // The first run leaves the writer behind and fails; the second one stays.
    let script = format!(
        "[ -e {} ] && exec sleep 1000; setsid sh -c {escaped:?} & sleep 0.3; exit 1",
        pidfile.display()
    );
    let up = Up::start(
        &format!(
            "[[supervisor.program]]\nname = \"leaver\"\ncommand = \"sh\"\nargs = [\"-c\", {script:?}]\n\
             restart = \"on-failure\"\n"
        ),
        PROGRAMS_ONLY,
    )
    .await;
    up.wait_unit("leaver", Duration::from_secs(10), "started again", |u| {
        u.state == UnitState::Running && u.restarts >= 1
    })
    .await;
    let escaped_pid: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let let_go = {
        let marker = marker.clone();
        tokio::time::timeout(Duration::from_secs(10), async move {
            while !marker.exists() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    };
    // SAFETY: kill(2) on the pid the escaped shell wrote (it ends by itself
    // once its writes fail; this covers the failure below).
    unsafe { libc::kill(escaped_pid as libc::pid_t, libc::SIGKILL) };
    assert!(let_go.is_ok(), "the old pipe is still read after the next start");
    up.stop().await;
}

/// A component whose run keeps failing (the lb with a certificate file that
/// cannot be used) backs off and ends `failed` after five starts; dns, in the
/// same supervisor, keeps answering all the while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_component_ends_failed_while_dns_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("up.internal.zone"), zone(1, "10.7.1.1")).unwrap();
    let pem = dir.path().join("broken.pem");
    std::fs::write(
        &pem,
        "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let up = Up::start_on_free_ports(
        || {
            format!(
                "[consul]\nhttp = \"127.0.0.1:{}\"\n\
             [dns]\nlisten = [\"127.0.0.1:{}\"]\nworkers = 1\nzones_dir = {:?}\n\
             [lb]\nhttp = \"127.0.0.1:{}\"\nhttps = \"127.0.0.1:{}\"\nssl = true\ncerts = [{:?}]\n\
             stats = \"\"\nregister = \"\"\nworkers = 1\n",
                free_port(),
                free_port(),
                dir.path().display().to_string(),
                free_port(),
                free_port(),
                pem.display().to_string(),
            )
        },
        &[("START_CONSUL", "false")],
    )
    .await;
    let dns = up.dns.unwrap();
    let failed = up
        .wait_unit("lb", Duration::from_secs(10), "marked failed", |u| {
            u.state == UnitState::Failed
        })
        .await;
    assert_eq!(failed.restarts, 4, "{failed:?}");
    assert!(
        failed.last_exit.as_deref().is_some_and(|l| l.contains("broken.pem")),
        "the reason names the file: {failed:?}"
    );
    assert_eq!(up.unit("dns").state, UnitState::Running);
    assert_eq!(up.unit("dns").restarts, 0);
    dig_until(
        dns,
        &["db.up.internal", "A"],
        Duration::from_secs(5),
        "dns unaffected",
        |d| d.answers() == ["10.7.1.1"],
    )
    .await;
    up.stop().await;
}

/// One line of the Prometheus text format: `name{labels} value`.
pub(crate) fn parse_metric(line: &str) -> Option<(String, HashMap<String, String>, f64)> {
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = if value == "+Inf" {
        f64::INFINITY
    } else {
        value.parse().ok()?
    };
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => {
            let body = rest.strip_suffix('}')?;
            let mut labels = HashMap::new();
            // Values are quoted and may hold escaped quotes; none of ours hold `",`.
            for pair in body.split("\",") {
                let (k, v) = pair.split_once("=\"")?;
                labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
            }
            (name.to_string(), labels)
        }
        None => (series.to_string(), HashMap::new()),
    };
    Some((name, labels, value))
}

fn zone(serial: u32, addr: &str) -> String {
    format!(
        "$TTL 60\n@ IN SOA ns.up.internal. hostmaster.up.internal. {serial} 3600 600 86400 30\n\
         @ IN NS ns.up.internal.\nns IN A 127.0.0.1\ndb IN A {addr}\n"
    )
}

/// A supervisor with dns and lb against `consul` (an agent that is not ours:
/// START_CONSUL=false) and one program, with the zones of a temp dir.
async fn full_up(consul: &Consul, zones: &std::path::Path, extra: &str) -> Up {
    Up::start_on_free_ports(
        || {
            format!(
                "{}[dns]\nlisten = [\"127.0.0.1:{}\"]\nworkers = 1\nzones_dir = {:?}\nzones_poll = \"1h\"\n\
             [lb]\nhttp = \"127.0.0.1:{}\"\nstats = \"\"\nregister = \"\"\nworkers = 1\n\
             [[supervisor.program]]\nname = \"helper\"\ncommand = \"sleep\"\nargs = [\"1000\"]\n{extra}",
                consul_section(consul),
                free_port(),
                zones.display().to_string(),
                free_port(),
            )
        },
        &[("START_CONSUL", "false")],
    )
    .await
}

/// `/api/status` shows units, Consul, services with instances and how to reach
/// them; the actions restart a program and a component and reload zones; the
/// vpn peer actions answer 409 saying how to turn the vpn on, and unknown or off
/// units are refused; `/metrics`
/// parses line by line and counts what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_actions_and_metrics() {
    // A private agent: this lb and page list every service of their agent, and
    // the shared one carries every other test's services and connections.
    let consul = &Consul::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("up.internal.zone"), zone(1, "10.7.0.1")).unwrap();
    let (svc, backend) = tagged_backend(consul, "adminweb", "admin-backend").await;
    let up = full_up(consul, dir.path(), "").await;
    let client = http_client();
    let dns = up.dns.unwrap();
    let lb = up.lb.unwrap();
    up.wait_unit("lb", Duration::from_secs(5), "running", |u| {
        u.state == UnitState::Running
    })
    .await;
    eventually(Duration::from_secs(10), "supervisor ready", || {
        up.state.ready.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;

    // Traffic through both components, for the counters.
    dig_until(
        dns,
        &["db.up.internal", "A"],
        Duration::from_secs(5),
        "zone served",
        |d| d.answers() == ["10.7.0.1"],
    )
    .await;
    let host = format!("{svc}.service.consul");
    let body = wait_routed(&client, lb, &host, Duration::from_secs(30), || lb_routes(&up)).await;
    assert_eq!(body, "admin-backend");

    let get_json = |path: &'static str| {
        let client = client.clone();
        let admin = up.admin;
        async move {
            let resp = client.get(format!("http://{admin}{path}")).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{path}");
            resp.json::<serde_json::Value>().await.unwrap()
        }
    };
    // Services are read from Consul per request; under a loaded machine one
    // read may time out, so ask until the picture is complete.
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        let status = get_json("/api/status").await;
        let complete = status["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == svc.as_str() && s["instances"].as_array().is_some_and(|i| !i.is_empty()));
        if complete || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status["ready"], true, "{status:#}");
    assert_eq!(status["consul"]["reachable"], true, "{:#}", status["consul"]);
    let units = status["units"].as_array().unwrap();
    let unit = |name: &str| units.iter().find(|u| u["name"] == name).unwrap().clone();
    assert_eq!(unit("dns")["state"], "running");
    assert_eq!(unit("lb")["state"], "running");
    assert_eq!(unit("consul")["state"], "off", "START_CONSUL=false");
    assert_eq!(unit("vpn")["state"], "off");
    assert_eq!(unit("helper")["state"], "running");
    let helper_pid = unit("helper")["pid"].as_u64().unwrap();
    assert!(unit("helper")["uptime_secs"].as_f64().unwrap() > 0.0);
    let service = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == svc.as_str())
        .unwrap_or_else(|| panic!("{svc} not in {:#}", status["services"]))
        .clone();
    assert_eq!(service["instances"][0]["health"], "passing", "{service:#}");
    assert_eq!(service["instances"][0]["lb"], "up", "{service:#}");
    assert_eq!(
        service["instances"][0]["address"],
        format!("127.0.0.1:{}", backend.addr.port())
    );
    assert!(
        service["dns_names"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(format!("{svc}.service.consul"))),
        "{service:#}"
    );
    let want_url = format!("http://{svc}.service.consul:{}/", lb.port());
    assert!(
        service["urls"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(want_url)),
        "{want_url} in {service:#}"
    );
    assert!(
        status["lb"]["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["service"] == svc.as_str())
    );
    assert!(status["dns"]["routes"]["zone"]["queries"].as_u64().unwrap() >= 1);
    assert_eq!(status["vpn"]["available"], false);
    assert_eq!(status["vpn"]["running"], false);
    assert_eq!(status["vpn"]["peers"], serde_json::json!([]));

    let post = |path: String| {
        let client = client.clone();
        let admin = up.admin;
        async move {
            let resp = client.post(format!("http://{admin}{path}")).send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    // Restart a program: a new pid, one restart counted.
    assert_eq!(post("/api/units/helper/restart".into()).await.0, 202);
    up.wait_unit("helper", Duration::from_secs(5), "restarted", |u| {
        u.state == UnitState::Running && u.pid.is_some_and(|p| u64::from(p) != helper_pid)
    })
    .await;
    // Restart a component: dns comes back on the same address.
    assert_eq!(post("/api/units/dns/restart".into()).await.0, 202);
    up.wait_unit("dns", Duration::from_secs(5), "restarted", |u| {
        u.state == UnitState::Running && u.restarts == 1
    })
    .await;
    dig_until(
        dns,
        &["db.up.internal", "A"],
        Duration::from_secs(5),
        "dns back after restart",
        |d| d.answers() == ["10.7.0.1"],
    )
    .await;
    // Reload zones (polling is an hour: only the action can do it).
    std::fs::write(dir.path().join("up.internal.zone"), zone(2, "10.7.0.2")).unwrap();
    let (code, body) = post("/api/dns/reload".into()).await;
    assert_eq!(code, 202, "{body}");
    dig_until(
        dns,
        &["db.up.internal", "A"],
        Duration::from_secs(3),
        "zones reloaded",
        |d| d.answers() == ["10.7.0.2"],
    )
    .await;
    // Cross-site requests: another page's POST (its Origin names another site)
    // is refused, with the form secret too; an opaque `Origin: null` needs the
    // secret; the page's own origin is fine.
    let from = |origin: &'static str, path: String| {
        let client = client.clone();
        async move {
            let resp = client.post(path).header("Origin", origin).send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    let restart = format!("http://{}/api/dns/reload", up.admin);
    let (code, body) = from("http://evil.example", restart.clone()).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("cross-site"), "{body}");
    assert_eq!(from("null", restart.clone()).await.0, 403);
    let own: &'static str = Box::leak(format!("http://{}", up.admin).into_boxed_str());
    assert_eq!(from(own, restart.clone()).await.0, 202);
    let page = client
        .get(format!("http://{}/", up.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let secret = page
        .split("csrf=")
        .nth(1)
        .and_then(|rest| rest.split(['"', '&']).next())
        .expect("the page's forms carry the form secret")
        .to_string();
    assert_eq!(from("null", format!("{restart}?csrf={secret}")).await.0, 202);
    assert_eq!(from("null", format!("{restart}?csrf=0{secret}")).await.0, 403);
    assert_eq!(
        from("http://evil.example", format!("{restart}?csrf={secret}")).await.0,
        403,
        "the secret never excuses an Origin naming another site"
    );
    // Refusals.
    assert_eq!(post("/api/units/nope/restart".into()).await.0, 404);
    let (code, body) = post("/api/units/consul/restart".into()).await;
    assert_eq!(code, 409, "{body}");
    // The vpn is off here: peer actions say how to turn it on.
    let (code, body) = post("/api/vpn/peers".into()).await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains("vpn.enabled = true") && body.contains("START_VPN=true"),
        "{body}"
    );
    let resp = client
        .delete(format!("http://{}/api/vpn/peers/laptop", up.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);

    // Metrics: every line is a comment or a sample of a declared family.
    let text = client
        .get(format!("http://{}/metrics", up.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut typed = HashMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            typed.insert(name.to_string(), kind.to_string());
        } else if line.starts_with("# HELP ") {
        } else {
            let (name, labels, value) = parse_metric(line).unwrap_or_else(|| panic!("unparsable: {line:?}"));
            assert!(name.starts_with("wayfinder_"), "{line}");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(&name)
                .to_string();
            assert!(typed.contains_key(&family), "sample before its # TYPE: {line}");
            samples.push((name, labels, value));
        }
    }
    let value = |name: &str, want: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .find(|(n, l, _)| n == name && want.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
            .map(|s| s.2)
            .unwrap_or_else(|| panic!("{name}{want:?} missing from:\n{text}"))
    };
    assert!(
        value(
            "wayfinder_dns_responses_total",
            &[("route", "zone"), ("rcode", "NOERROR")]
        ) >= 2.0
    );
    assert_eq!(value("wayfinder_supervisor_restarts_total", &[("unit", "dns")]), 1.0);
    assert_eq!(value("wayfinder_supervisor_restarts_total", &[("unit", "helper")]), 1.0);
    assert_eq!(value("wayfinder_supervisor_unit_up", &[("unit", "lb")]), 1.0);
    assert!(value("wayfinder_lb_http_responses_total", &[("code", "2xx")]) >= 1.0);
    assert!(
        value(
            "wayfinder_lb_backend_http_responses_total",
            &[("proxy", &svc), ("code", "2xx")]
        ) >= 1.0
    );
    assert_eq!(
        value("wayfinder_lb_server_up", &[("proxy", &svc)]),
        1.0,
        "the backend is up"
    );
    assert!(value("wayfinder_lb_request_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(
        value("wayfinder_lb_request_duration_seconds_bucket", &[("le", "+Inf")]),
        value("wayfinder_lb_request_duration_seconds_count", &[])
    );
    assert!(
        value(
            "wayfinder_dns_upstream_request_duration_seconds_count",
            &[("route", "consul")]
        ) >= 0.0
    );
    assert_eq!(value("wayfinder_consul_up", &[]), 1.0);
    assert_eq!(value("wayfinder_up_ready", &[]), 1.0);
    // Issue 21: the requests the lb answered itself, and its body memory.
    for reason in ["body_too_slow", "request_deadline", "over_share"] {
        assert_eq!(value("wayfinder_lb_requests_refused_total", &[("reason", reason)]), 0.0);
    }
    assert_eq!(value("wayfinder_lb_body_buffer_bytes", &[]), 0.0);
    // Prometheus conventions: counters end in `_total`, histograms are in
    // seconds, and every name is in base units (no `_ms`, `_us`, `_kb`).
    for (family, kind) in &typed {
        match kind.as_str() {
            "counter" => assert!(family.ends_with("_total"), "counter {family} must end in _total"),
            "histogram" => assert!(family.ends_with("_seconds"), "histogram {family} must be in seconds"),
            _ => {}
        }
        for unit in ["_ms", "_us", "_millis", "_kb", "_mb"] {
            assert!(!family.contains(unit), "{family}: base units only");
        }
    }
    assert!(
        !text.contains("wayfinder_vpn_"),
        "no vpn series while it is off:\n{text}"
    );

    // Stopping drains: a request in flight when shutdown starts still gets its answer.
    let slow = tokio::spawn({
        let client = client.clone();
        let host = format!("{svc}.service.consul");
        async move {
            let resp = client
                .get(format!("http://{lb}/slow"))
                .header("Host", host)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    up.stop().await;
    assert_eq!(slow.await.unwrap(), (200, "admin-backend".to_string()), "drained");
    consul.deregister(&format!("{svc}-1"));
}

/// With a token, every request needs it (header or `?token=`); without, 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_is_required_when_set() {
    let up = Up::start("[supervisor]\ntoken = \"test-token-123\"\n", PROGRAMS_ONLY).await;
    let client = http_client();
    for path in ["/", "/api/status", "/api/ready", "/metrics"] {
        let resp = client.get(format!("http://{}{path}", up.admin)).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{path}");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        let resp = client
            .get(format!("http://{}{path}", up.admin))
            .bearer_auth("wrong-token-456")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{path} with a wrong token");
        let resp = client
            .get(format!("http://{}{path}", up.admin))
            .bearer_auth("test-token-123")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path} with the token");
    }
    let resp = client
        .get(format!("http://{}/api/status?token=test-token-123", up.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "token in the query");
    let resp = client
        .post(format!("http://{}/api/dns/reload", up.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "actions too");

    // `wayfinder status` against it: refused without the token, fine with it.
    let dir = tempfile::tempdir().unwrap();
    let status = |token: Option<&str>| {
        let mut cmd = std::process::Command::new(crate::harness::wayfinder_bin());
        cmd.args(["status", "--admin", &up.admin.to_string()])
            .current_dir(dir.path());
        for (var, _) in wayfinder::env::VARS {
            cmd.env_remove(var);
        }
        if let Some(t) = token {
            cmd.env("WAYFINDER_ADMIN_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let out = status(None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "no status: {err}");
    assert!(err.contains("401"), "{err}");
    let out = status(Some("test-token-123"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("UNIT"));
    up.stop().await;
}

/// DNS rebinding: a page on http://attacker.example:PORT whose name now
/// resolves to 127.0.0.1 sends `Host` and `Origin` naming attacker.example.
/// Every request under a foreign Host is refused (421), the status page with its
/// form secret included, and an action too, even with the secret; under the
/// endpoint's own names (any case, trailing dot, any port) all works, and an
/// action's Origin is checked against those names, not against the Host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_refuses_dns_rebinding() {
    let up = Up::start(
        "[[supervisor.program]]\nname = \"helper\"\ncommand = \"sleep\"\nargs = [\"1000\"]\n",
        PROGRAMS_ONLY,
    )
    .await;
    up.wait_unit("helper", Duration::from_secs(5), "running", |u| {
        u.state == UnitState::Running
    })
    .await;
    let client = http_client();
    let port = up.admin.port();
    let csrf = up.state.csrf.clone();
    let attacker = format!("attacker.example:{port}");
    let attacker_origin = format!("http://{attacker}");
    let get = |host: String, path: &'static str| {
        let client = client.clone();
        let admin = up.admin;
        async move {
            let resp = client
                .get(format!("http://{admin}{path}"))
                .header("Host", host)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    let post = |host: String, origin: Option<String>, path: String| {
        let client = client.clone();
        let admin = up.admin;
        async move {
            let mut req = client.post(format!("http://{admin}{path}")).header("Host", host);
            if let Some(o) = origin {
                req = req.header("Origin", o);
            }
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };

    // The rebinding page reads nothing: not the page, not its secret, not the API.
    for path in ["/", "/api/status", "/metrics", "/healthz"] {
        let (code, body) = get(attacker.clone(), path).await;
        assert_eq!(code, 421, "{path}: {body}");
        assert!(!body.contains(&csrf), "{path} leaks the form secret: {body}");
        assert!(body.contains("own names"), "{body}");
    }
    let (code, body) = get("ATTACKER.example.".into(), "/").await;
    assert_eq!(code, 421, "{body}");

    // Nor can it act, with or without the secret.
    let restart = "/api/units/helper/restart".to_string();
    let (code, body) = post(attacker.clone(), Some(attacker_origin.clone()), restart.clone()).await;
    assert_eq!(code, 421, "{body}");
    let (code, body) = post(
        attacker.clone(),
        Some(attacker_origin.clone()),
        format!("{restart}?csrf={csrf}"),
    )
    .await;
    assert_eq!(code, 421, "{body}");
    let (code, body) = post(attacker.clone(), None, restart.clone()).await;
    assert_eq!(code, 421, "no Origin does not make a foreign Host fine: {body}");
    // An own Host with a foreign Origin: the Origin is checked on its own.
    let own = format!("127.0.0.1:{port}");
    let (code, body) = post(own.clone(), Some(attacker_origin.clone()), restart.clone()).await;
    assert_eq!(code, 403, "{body}");
    let (code, body) = post(
        own.clone(),
        Some(attacker_origin.clone()),
        format!("{restart}?csrf={csrf}"),
    )
    .await;
    assert_eq!(code, 403, "the secret does not excuse another site: {body}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(up.unit("helper").restarts, 0, "no refused request restarted it");

    // The endpoint's own names work.
    let (code, page) = get(own.clone(), "/").await;
    assert_eq!(code, 200);
    assert!(page.contains(&csrf), "the page carries its form secret");
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    for host in [
        format!("localhost:{port}"),
        format!("LocalHost.:{port}"),
        "127.0.0.1".to_string(),
        format!("[::1]:{port}"),
        format!("{}:{port}", hostname.to_uppercase()),
        // Another port: an SSH tunnel's.
        "localhost:8080".to_string(),
    ] {
        let (code, body) = get(host.clone(), "/api/units").await;
        assert_eq!(code, 200, "{host}: {body}");
    }
    let (code, body) = post(own.clone(), Some(format!("http://{own}")), restart.clone()).await;
    assert_eq!(code, 202, "{body}");
    up.wait_unit("helper", Duration::from_secs(5), "restarted", |u| {
        u.state == UnitState::Running && u.restarts == 1
    })
    .await;
    let (code, body) = post(own.clone(), Some(format!("http://localhost:{port}")), restart.clone()).await;
    assert_eq!(code, 202, "{body}");
    let (code, body) = post(own.clone(), None, restart.clone()).await;
    assert_eq!(code, 202, "curl: {body}");
    up.stop().await;
}

/// Headless Chromium without anything that reaches out or needs a desktop.
pub(crate) const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
];

/// Runs headless Chromium from Debian with a fresh profile; `args` add the mode
/// (`--dump-dom` or `--screenshot=...`).
pub(crate) async fn chromium(url: &str, args: &[String]) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(require("chromium"))
        .args(CHROMIUM_FLAGS)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("chromium finishes within 60 s")
        .expect("run chromium")
}

/// The status page in a real browser: the rendered DOM names the service, its
/// instance and health, the DNS name and URL that reach it, and every unit; a
/// phone-sized screenshot is saved under target/ for people to look at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_headless_chromium() {
    let consul = &Consul::start();
    let dir = tempfile::tempdir().unwrap();
    let (svc, backend) = tagged_backend(consul, "pageweb", "page-backend").await;
    let up = full_up(consul, dir.path(), "").await;
    eventually(Duration::from_secs(10), "supervisor ready", || {
        up.state.ready.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    let lb = up.lb.unwrap();
    let client = http_client();
    // Wait until the lb routes it, so the page shows its URL.
    let host = format!("{svc}.service.consul");
    wait_routed(&client, lb, &host, Duration::from_secs(30), || lb_routes(&up)).await;

    let url = format!("http://{}/", up.admin);
    let out = chromium(&url, &["--dump-dom".to_string()]).await;
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium failed: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        svc.as_str(),
        &format!("127.0.0.1:{}", backend.addr.port()),
        "passing",
        &format!("{svc}.service.consul"),
        &format!("http://{svc}.service.consul:{}/", lb.port()),
        "Components and programs",
        ">dns<",
        ">lb<",
        ">helper<",
        "VPN peers",
        "The vpn is off on this host",
        "START_VPN=true",
        "Consul: connected",
    ] {
        assert!(dom.contains(want), "`{want}` not in the rendered page:\n{dom}");
    }

    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let png = shots.join("status-page-phone.png");
    let _ = std::fs::remove_file(&png);
    let out = chromium(
        &url,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=390,844".into(),
        ],
    )
    .await;
    let bytes = std::fs::read(&png).unwrap_or_else(|e| {
        panic!(
            "no screenshot at {} ({e}); chromium said:\n{}",
            png.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    assert!(bytes.len() > 10_000, "a non-trivial picture: {} bytes", bytes.len());
    // IHDR: width and height as big-endian u32 at bytes 16..24.
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    assert_eq!(width, 390, "phone width");
    println!("status page screenshot: {}", png.display());

    up.stop().await;
    consul.deregister(&format!("{svc}-1"));
}
