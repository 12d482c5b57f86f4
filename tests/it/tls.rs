//! Agents reach a broker over `wss://` (here through a TLS-terminating proxy, as in
//! most deployments), trusting a private certificate authority.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::support::{AGENT_KEY, TestBroker, eventually};

/// A private CA and a certificate it signed for `localhost`.
pub(crate) fn certificates() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    (ca_cert.pem(), leaf.der().clone(), key)
}

/// Terminates TLS on a loopback port and forwards the bytes to `upstream`.
async fn tls_proxy(upstream: std::net::SocketAddr, cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> u16 {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_connects_over_wss_trusting_a_private_ca() {
    let broker = TestBroker::start().await;
    let api = broker.api();
    let (ca_pem, cert, key) = certificates();
    let port = tls_proxy(broker.addr, cert, key).await;
    let ca_file = std::env::temp_dir().join(format!("periscope-ca-{}.pem", periscope_protocol::ActionId::generate()));
    std::fs::write(&ca_file, ca_pem).unwrap();

    let agent = periscope_agent::Agent::builder()
        .broker_url(format!("wss://localhost:{port}/agents"))
        .agent_key(AGENT_KEY)
        .pool("tls")
        .ca_cert(&ca_file)
        .reconnect_initial(Duration::from_millis(100))
        .reconnect_max(Duration::from_millis(500))
        .start()
        .unwrap();
    let id = agent.id().to_string();
    eventually(Duration::from_secs(15), "the agent online over wss", || {
        let api = api.clone();
        let id = id.clone();
        async move {
            let (_, v) = api.get(&format!("/agents/{id}")).await;
            (v["status"] == "online").then_some(())
        }
    })
    .await;

    // A CA file that is not one is refused when the agent is configured.
    let bad = std::env::temp_dir().join(format!("periscope-bad-{}.pem", periscope_protocol::ActionId::generate()));
    std::fs::write(&bad, "not a certificate").unwrap();
    let err = periscope_agent::Agent::builder()
        .broker_url(format!("wss://localhost:{port}"))
        .agent_key(AGENT_KEY)
        .ca_cert(&bad)
        .build_config()
        .unwrap_err();
    assert!(err.to_string().starts_with("ca_cert:"), "{err}");
    agent.shutdown(Duration::from_secs(2));
    let _ = std::fs::remove_file(&ca_file);
    let _ = std::fs::remove_file(&bad);
    broker.stop().await;
}
