//! The lb's HTTPS listener (certificates by SNI, HTTP/2 by ALPN, reload when the
//! files change) and its stats listener, with curl as the independent client.

use std::path::Path;
use std::time::Duration;

use crate::harness::{Consul, HttpBackend, Lb, consul_section, eventually, free_port, require, tagged_backend, unique};

/// Writes a self-signed certificate for `names` (CN = the first) with its key,
/// HAProxy style.
pub fn write_cert(path: &Path, names: &[&str]) {
    let mut params = rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("certificate params");
    params.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed");
    std::fs::write(path, format!("{}{}", cert.pem(), key.serialize_pem())).expect("write pem");
}

/// What curl saw over HTTPS.
#[derive(Debug)]
struct Curl {
    /// `1.1` or `2`.
    version: String,
    status: u16,
    body: String,
    /// The certificate's subject line from curl's verbose output.
    subject: String,
    /// Response headers, lower-case names.
    headers: String,
}

/// `curl -k https://<host>:<port><path>` connecting to `addr` (SNI = host).
async fn curl(addr: std::net::SocketAddr, host: &str, path: &str, http2: bool) -> Curl {
    let curl = require("curl");
    let out = tokio::process::Command::new(curl)
        .args([
            "-sk",
            "-v",
            "--max-time",
            "5",
            if http2 { "--http2" } else { "--http1.1" },
            "--resolve",
            &format!("{host}:{}:{}", addr.port(), addr.ip()),
            "-D",
            "/dev/stderr",
            "-w",
            "\n%{http_version} %{http_code}",
            &format!("https://{host}:{}{path}", addr.port()),
        ])
        .output()
        .await
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let (body, last) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let mut last = last.split_whitespace();
    let version = last.next().unwrap_or_default().to_string();
    let status = last.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let subject = stderr
        .lines()
        .find(|l| l.contains(" subject:"))
        .unwrap_or_default()
        .to_string();
    Curl {
        version,
        status,
        body: body.to_string(),
        subject,
        headers: stderr.to_ascii_lowercase(),
    }
}

async fn tls_lb(consul: &Consul, certs: &Path) -> Lb {
    Lb::start(&format!(
        "{}[dns]\nwildcard_domain = \".apps.example.com\"\nwildcard_targets = [\"127.0.0.1\"]\n\
         [lb]\nssl = true\ncerts = [\"{}\"]\n",
        consul_section(consul),
        certs.display()
    ))
    .await
}

/// The certificate is chosen by SNI (exact, wildcard, else the first file);
/// HTTP/2 is spoken when the client offers it, HTTP/1.1 otherwise; the backend
/// sees `X-Forwarded-Proto: https` and a Host header in both cases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_chooses_the_certificate_by_sni_and_speaks_h2() {
    let consul = Consul::shared();
    let dir = tempfile::tempdir().unwrap();
    write_cert(&dir.path().join("a-first.pem"), &["first.example.test"]);
    write_cert(&dir.path().join("b-apps.pem"), &["*.apps.example.com"]);
    let (svc, _backend) = tagged_backend(consul, "tls", "secure").await;
    let lb = tls_lb(consul, dir.path()).await;
    lb.wait_for(&format!("{svc}.service"), "/", &["secure"]).await;
    let https = lb.https.expect("https listener");

    let host = format!("{svc}.apps.example.com");
    let c = curl(https, &host, "/x", true).await;
    assert_eq!(
        (c.status, c.body.as_str(), c.version.as_str()),
        (200, "secure", "2"),
        "{c:?}"
    );
    assert!(c.subject.contains("*.apps.example.com"), "wildcard certificate: {c:?}");
    assert!(c.headers.contains("x-seen-proto: https"), "{c:?}");
    assert!(c.headers.contains(&format!("x-seen-host: {host}")), "{c:?}");

    let c = curl(https, &host, "/x", false).await;
    assert_eq!(
        (c.status, c.body.as_str(), c.version.as_str()),
        (200, "secure", "1.1"),
        "{c:?}"
    );
    assert!(c.headers.contains("x-seen-proto: https"), "{c:?}");

    let c = curl(https, &format!("{svc}.service.consul"), "/", true).await;
    assert_eq!(c.status, 200, "{c:?}");
    assert!(
        c.subject.contains("first.example.test"),
        "unknown name gets the first file: {c:?}"
    );
    let c = curl(https, "first.example.test", "/", true).await;
    assert!(c.subject.contains("first.example.test"), "{c:?}");
    assert_eq!(c.status, 503, "no service of that name: {c:?}");

    // Plain HTTP still works next to HTTPS and says so to the backend.
    let (status, _, headers) = lb.get(&host, "/").await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-seen-proto"], "http");
}

/// A changed certificate file is served from the next handshake on; a broken
/// file is refused and the previous certificate stays in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_when_files_change() {
    let consul = Consul::shared();
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("site.pem");
    write_cert(&pem, &["old.example.test"]);
    let lb = tls_lb(consul, &pem).await;
    let https = lb.https.expect("https listener");
    let c = curl(https, "old.example.test", "/", false).await;
    assert!(c.subject.contains("old.example.test"), "{c:?}");

    // Written elsewhere and renamed into place, as certbot and friends do.
    let next = dir.path().join("next.tmp");
    write_cert(&next, &["new.example.test"]);
    std::fs::rename(&next, &pem).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c = curl(https, "new.example.test", "/", false).await;
        if c.subject.contains("new.example.test") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "new certificate never served: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let c = curl(https, "new.example.test", "/", false).await;
    assert!(
        c.subject.contains("new.example.test"),
        "last good certificate kept: {c:?}"
    );
    assert_eq!(c.status, 503, "{c:?}");
}

/// The stats listener: the page lists the routes with their instances, the JSON
/// carries per-route counters, the Consul state and the certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_listener_shows_routes_and_counters() {
    let consul = Consul::shared();
    let svc = unique("stats");
    let (b1, b2) = (HttpBackend::start("s1").await, HttpBackend::start("s2").await);
    let route = format!("haproxy_route=/{svc}");
    for (i, b) in [&b1, &b2].into_iter().enumerate() {
        consul.register(
            &format!("{svc}-{i}"),
            &svc,
            "127.0.0.1",
            b.addr.port(),
            &["haproxy", &route],
            true,
        );
    }
    let lb = Lb::start(&consul_section(consul)).await;
    lb.wait_for(&format!("{svc}.service"), "/", &["s1", "s2"]).await;
    let before = route_requests(&lb, &svc);
    for _ in 0..5 {
        let (status, _, _) = lb.get(&format!("{svc}.service.consul"), "/").await;
        assert_eq!(status, 200);
    }
    let (status, _, _) = lb.get("nobody.service.consul", "/").await;
    assert_eq!(status, 503);
    let stats = lb.stats;
    eventually(Duration::from_secs(5), "per-route counters", || {
        route_requests(&lb, &svc) == before + 5
    })
    .await;

    let get = |path: &str| lb.client.get(format!("http://{stats}{path}")).send();
    let resp = get("/stats.json").await.expect("stats.json");
    assert_eq!(resp.headers()["content-type"], "application/json");
    let json: serde_json::Value = resp.json().await.expect("JSON");
    assert_eq!(json["consul_ok"], true);
    let route = json["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == svc.as_str())
        .expect("route listed");
    assert_eq!(route["requests"]["status_classes"][2], before + 5);
    assert_eq!(route["instances"].as_array().unwrap().len(), 2);
    assert_eq!(route["instances"][0]["available"], true);
    assert_eq!(route["maxconn"], 128);
    let names: Vec<&str> = route["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(names.contains(&format!("{svc}.service.consul").as_str()), "{names:?}");
    assert!(names.contains(&format!("*/{svc}").as_str()), "{names:?}");
    assert!(
        json["requests"]["status_classes"][5].as_u64().unwrap() >= 1,
        "the 503 counts"
    );
    assert!(json["changes"].as_u64().unwrap() >= 1);

    let resp = get("/").await.expect("status page");
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = resp.text().await.unwrap();
    assert!(page.contains(&svc) && page.contains(&b1.addr.to_string()), "{page}");
    assert_eq!(get("/nope").await.expect("404").status(), 404);
}

fn route_requests(lb: &Lb, svc: &str) -> u64 {
    let status = wayfinder::lb::status::LbStatus::collect(&lb.state);
    status
        .routes
        .iter()
        .find(|r| r.service == svc)
        .map_or(0, |r| r.requests.status_classes[2])
}

/// `curl --cacert <ca> https://<host>:<port>/` connecting to `addr`: the
/// certificate must verify against `ca` for `host`. (status, body), or curl's
/// error when the handshake or the verification fails.
async fn curl_verified(addr: std::net::SocketAddr, host: &str, ca: &Path) -> Result<(u16, String), String> {
    let out = tokio::process::Command::new(require("curl"))
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(ca)
        .args([
            "--resolve",
            &format!("{host}:{}:{}", addr.port(), addr.ip()),
            "-w",
            "\n%{http_code}",
            &format!("https://{host}:{}/", addr.port()),
        ])
        .output()
        .await
        .expect("run curl");
    if !out.status.success() {
        return Err(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

/// The SHA-256 of the first certificate in a PEM file, as the lb logs it.
fn file_fingerprint(pem: &Path) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_file(pem).unwrap_or_else(|e| panic!("{}: {e}", pem.display()));
    wayfinder::lb::tls::fingerprint(der.as_ref())
}

/// The lb's certificates as `/stats.json` lists them.
async fn stats_certificates(lb: &Lb) -> Vec<serde_json::Value> {
    let json: serde_json::Value = lb
        .client
        .get(format!("http://{}/stats.json", lb.stats))
        .send()
        .await
        .expect("stats.json")
        .json()
        .await
        .expect("JSON");
    json["certificates"].as_array().cloned().unwrap_or_default()
}

/// HTTPS on without certificate files (PanteraS's first start served its
/// default certificate): the lb makes a self-signed certificate for the host's
/// names and the wildcard domain, 0600 in `lb.state_dir`; a client that trusts
/// that file gets a routed answer; a restart serves the same certificate
/// (same fingerprint, file untouched); configured files replace it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_without_certificates_serves_a_kept_self_signed_one() {
    use std::os::unix::fs::PermissionsExt;
    let consul = Consul::shared();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (svc, _backend) = tagged_backend(consul, "selfsig", "first-start").await;
    let toml = |certs: &str| {
        format!(
            "{}[dns]\nwildcard_domain = \".apps.example.com\"\nwildcard_targets = [\"127.0.0.1\"]\n\
             [lb]\nssl = true\nstate_dir = \"{}\"\n{certs}",
            consul_section(consul),
            state.display()
        )
    };
    let pem = state.join("selfsigned.pem");

    let lb = Lb::start(&toml("")).await;
    lb.wait_for(&format!("{svc}.service"), "/", &["first-start"]).await;
    let https = lb.https.expect("https listener");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&pem), 0o600);
    let made = std::fs::read(&pem).unwrap();
    let fingerprint = file_fingerprint(&pem);
    // The names it was made for verify (localhost: the landing page).
    let answer = curl_verified(https, "localhost", &pem).await;
    assert!(matches!(&answer, Ok((200, _))), "localhost: {answer:?}");
    assert_eq!(
        curl_verified(https, &format!("{svc}.apps.example.com"), &pem).await,
        Ok((200, "first-start".into()))
    );
    let rejected = curl_verified(https, "elsewhere.example.test", &pem).await;
    assert!(rejected.is_err(), "a name it was not made for: {rejected:?}");
    let certs = stats_certificates(&lb).await;
    assert_eq!(certs.len(), 1, "{certs:?}");
    assert_eq!(certs[0]["self_signed"], true, "{certs:?}");
    assert_eq!(certs[0]["sha256"], fingerprint.as_str(), "{certs:?}");
    let page = lb
        .client
        .get(format!("http://{}/", lb.stats))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("self-signed") && page.contains(&fingerprint), "{page}");
    lb.stop().await;

    // The next start: the same certificate, not a new one.
    let lb = Lb::start(&toml("")).await;
    lb.wait_for(&format!("{svc}.service"), "/", &["first-start"]).await;
    let https = lb.https.expect("https listener");
    assert_eq!(
        curl_verified(https, &format!("{svc}.apps.example.com"), &pem).await,
        Ok((200, "first-start".into()))
    );
    assert_eq!(std::fs::read(&pem).unwrap(), made, "the kept file was rewritten");
    assert_eq!(stats_certificates(&lb).await[0]["sha256"], fingerprint.as_str());
    lb.stop().await;

    // Certificates configured: they are served, the self-signed one is not.
    let site = dir.path().join("site.pem");
    write_cert(&site, &["*.apps.example.com"]);
    let lb = Lb::start(&toml(&format!("certs = [\"{}\"]\n", site.display()))).await;
    lb.wait_for(&format!("{svc}.service"), "/", &["first-start"]).await;
    let https = lb.https.expect("https listener");
    let host = format!("{svc}.apps.example.com");
    assert_eq!(
        curl_verified(https, &host, &site).await,
        Ok((200, "first-start".into()))
    );
    assert!(
        curl_verified(https, &host, &pem).await.is_err(),
        "still the self-signed one"
    );
    let certs = stats_certificates(&lb).await;
    assert_eq!(certs.len(), 1, "{certs:?}");
    assert_eq!(certs[0]["self_signed"], false, "{certs:?}");
    assert_eq!(certs[0]["sha256"], file_fingerprint(&site).as_str());
}

/// Before the first complete read of Consul (here: no agent answers at all),
/// a request waits `ready_timeout` for it, then gets 503 with `Retry-After: 1`
/// and says why, on each path: plain HTTP/1.1, HTTP/1.1 over TLS and h2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_catalog_is_read_every_path_answers_503_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("web.pem");
    write_cert(&certs, &["web.service"]);
    // Nothing listens on these ports: the lb never becomes ready.
    let (http, dns) = (free_port(), free_port());
    let lb = Lb::start(&format!(
        "[consul]\nhttp = \"127.0.0.1:{http}\"\ndns = [\"127.0.0.1:{dns}\"]\n\
         [lb]\nready_timeout = \"300ms\"\nssl = true\ncerts = [\"{}\"]\n",
        certs.display()
    ))
    .await;
    assert!(!lb.state.is_ready());
    let why = "still reading the service catalog from Consul";
    let (status, body, headers) = lb.get("web.service", "/").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(why), "{body}");
    assert_eq!(headers.get("retry-after").map(|v| v.as_bytes()), Some(&b"1"[..]));
    let https = lb.https.expect("https listener");
    for http2 in [false, true] {
        let answer = curl(https, "web.service", "/", http2).await;
        assert_eq!(answer.version, if http2 { "2" } else { "1.1" }, "{answer:?}");
        assert_eq!(answer.status, 503, "{answer:?}");
        assert!(answer.body.contains(why), "{answer:?}");
        assert!(answer.headers.contains("\nretry-after: 1\r"), "{answer:?}");
    }
}
