//! What a Consul registrant can make the lb do (issue 11 §1): the appliance's
//! own listeners are never proxied to, checked or spliced to; `haproxy_tcp`
//! never takes a privileged or an own port; `lb.backend_networks` limits the
//! rest; names that are not DNS labels are refused. Against a real `up`
//! (admin endpoint, dns, lb) on the shared Consul.

use std::time::Duration;

use wayfinder::lb::policy::RefusalReason;

use crate::harness::{Consul, Lb, Up, consul_section, eventually, free_port, http_client, tagged_backend, wait_routed};

/// The refusals the lb of `up` reports for `service`.
fn refusals(up: &Up, service: &str) -> Vec<RefusalReason> {
    up.state
        .component_of::<wayfinder::lb::component::Lb>()
        .and_then(|lb| lb.state())
        .map_or_else(Vec::new, |lb| {
            lb.table
                .load()
                .refused()
                .filter(|r| r.service == service)
                .map(|r| r.reason.clone())
                .collect()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_cannot_point_the_lb_at_the_appliance() {
    let consul = Consul::shared();
    let up = Up::start_on_free_ports(
        || {
            format!(
                "{}[dns]\nlisten = [\"127.0.0.1:{}\"]\nworkers = 1\n\
                 [lb]\nhttp = \"127.0.0.1:{}\"\nstats = \"127.0.0.1:{}\"\nregister = \"\"\nworkers = 1\n",
                consul_section(consul),
                free_port(),
                free_port(),
                free_port(),
            )
        },
        &[("START_CONSUL", "false"), ("START_VPN", "false")],
    )
    .await;
    let lb = up.lb.expect("lb runs");
    let dns = up.dns.expect("dns runs");
    let admin = up.admin;
    let client = http_client();

    // The attacks: the admin endpoint (with an HTTP check that would poke it),
    // the lb's own HTTP port, TCP/1 and the dns's TCP port (Consul itself refuses 0.0.0.0).
    let (legit, _backend) = tagged_backend(consul, "trust-ok", "legit").await;
    let to_admin = crate::harness::unique("trust-admin");
    let to_lb = crate::harness::unique("trust-lb");
    let tcp_low = crate::harness::unique("trust-tcp1");
    let tcp_dns = crate::harness::unique("trust-tcpdns");
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    consul.register(
        &format!("{to_admin}-1"),
        &to_admin,
        "127.0.0.1",
        admin.port(),
        &["haproxy", "haproxy_httpchk=GET /"],
        true,
    );
    consul.register(
        &format!("{to_lb}-1"),
        &to_lb,
        "127.0.0.1",
        lb.port(),
        &["haproxy"],
        true,
    );
    consul.register(
        &format!("{tcp_low}-1"),
        &tcp_low,
        "127.0.0.1",
        echo_port,
        &["haproxy_tcp=1"],
        true,
    );
    let dns_tag = format!("haproxy_tcp={}", dns.port());
    consul.register(
        &format!("{tcp_dns}-1"),
        &tcp_dns,
        "127.0.0.1",
        echo_port,
        &[&dns_tag],
        true,
    );

    wait_routed(
        &client,
        lb,
        &format!("{legit}.service"),
        Duration::from_secs(15),
        String::new,
    )
    .await;
    eventually(Duration::from_secs(10), "every attack refused", || {
        refusals(&up, &to_admin) == [RefusalReason::OwnListener { listener: "admin" }]
            && refusals(&up, &to_lb) == [RefusalReason::OwnListener { listener: "lb http" }]
            && refusals(&up, &tcp_low) == [RefusalReason::PortNotAllowed]
            && refusals(&up, &tcp_dns) == [RefusalReason::PortTaken { listener: "dns" }]
    })
    .await;

    // Through the lb, the admin endpoint is not there: no page, no peer config.
    for host in [format!("{to_admin}.service"), format!("{to_lb}.service")] {
        let resp = client
            .get(format!("http://{lb}/"))
            .header("Host", &host)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 503, "{host}");
        let body = resp.text().await.unwrap();
        assert!(!body.contains("wayfinder up"), "{host} reached the admin page: {body}");
    }
    let resp = client
        .post(format!("http://{lb}/api/vpn/peers"))
        .header("Host", format!("{to_admin}.service"))
        .body("{\"name\":\"evil\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    // No listener on TCP/1; the dns keeps its TCP port.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", 1)).is_err(),
        "TCP/1 was opened"
    );
    let lb_state = up
        .state
        .component_of::<wayfinder::lb::component::Lb>()
        .and_then(|lb| lb.state())
        .unwrap();
    assert!(lb_state.table.load().tcp_ports().next().is_none());

    // The status pages show it: the lb's stats and the admin's status.
    let stats = wayfinder::lb::status::LbStatus::collect(&lb_state);
    let page = stats.render_html();
    assert!(
        page.contains("Refused from Consul") && page.contains(&to_admin),
        "{page}"
    );
    let status: serde_json::Value = client
        .get(format!("http://{admin}/api/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let services = status["services"].as_array().expect("services listed");
    let instance = services
        .iter()
        .find(|s| s["name"] == to_admin.as_str())
        .and_then(|s| s["instances"][0]["lb"].as_str())
        .map(str::to_string);
    assert_eq!(
        instance.as_deref(),
        Some("refused: the address is the appliance's own admin listener")
    );

    for svc in [&to_admin, &to_lb, &tcp_low, &tcp_dns, &legit] {
        consul.deregister(&format!("{svc}-1"));
    }
    up.stop().await;
}

/// `lb.backend_networks`: an instance outside it is refused, one inside routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_networks_limit_where_the_lb_connects() {
    let consul = Consul::shared();
    let (inside, _a) = tagged_backend(consul, "nets-in", "inside").await;
    let outside = crate::harness::unique("nets-out");
    consul.register(
        &format!("{outside}-1"),
        &outside,
        "192.0.2.10",
        8080,
        &["haproxy"],
        true,
    );
    let lb = Lb::start(&format!(
        "{}[lb]\nbackend_networks = [\"127.0.0.0/8\"]\n",
        consul_section(consul)
    ))
    .await;
    lb.wait_for(&format!("{inside}.service"), "/", &["inside"]).await;
    eventually(Duration::from_secs(10), "the outside instance refused", || {
        lb.state
            .table
            .load()
            .refused()
            .any(|r| r.service == outside && r.reason == RefusalReason::OutsideNetworks)
    })
    .await;
    let (status, _, _) = lb.get(&format!("{outside}.service"), "/").await;
    assert_eq!(status, 503);
    consul.deregister(&format!("{inside}-1"));
    consul.deregister(&format!("{outside}-1"));
    lb.stop().await;
}
