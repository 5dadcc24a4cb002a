//! The local managed-identity endpoint (`tests/common/msi.rs`): IMDS and App Service hand out
//! real IdP tokens that the simulated backend in bearer mode accepts, for the system-assigned
//! identity and for a user-assigned one named by any of its ids; requests are checked the way
//! Azure checks them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::bearer_sim;
use common::idp::{decode_unverified, form, Idp};
use common::msi::{Identity, Msi};
use portcullis::sim::SimHandle;
use serde_json::{json, Value};

const AUD: &str = "https://cognitiveservices.azure.com";

/// GET `url?query` with these headers: the status and the JSON body.
async fn get(url: &str, query: &[(&str, &str)], headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = common::http().get(format!("{url}?{}", form(query)));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// The sim's answer to a chat completion with this token, and the claims it recorded.
async fn use_token(sim: &SimHandle, token: &str) -> Value {
    let resp = common::http()
        .post(format!(
            "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            sim.url()
        ))
        .bearer_auth(token)
        .json(&common::chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    sim.bearer_tokens().pop().unwrap().claims
}

fn epoch(v: &Value) -> u64 {
    v.as_str()
        .unwrap_or_else(|| panic!("{v} is not a string"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn imds_and_app_service_tokens_are_accepted_by_the_backend() {
    let idp = Idp::start().await;
    let ua = Identity::user_assigned("gateway-ua");
    let msi = Msi::start(&idp, std::slice::from_ref(&ua)).await;
    let sim = bearer_sim(&idp).await;
    let system = msi.system_identity().clone();
    // IMDS, every field a string, as IMDS sends them.
    for (param, who) in [
        (None, &system),
        (Some(("client_id", ua.client_id.as_str())), &ua),
        (Some(("object_id", ua.object_id.as_str())), &ua),
        (Some(("msi_res_id", ua.mi_res_id.as_str())), &ua),
    ] {
        let mut q = vec![("api-version", "2018-02-01"), ("resource", AUD)];
        q.extend(param);
        let (status, body) = get(&msi.imds_url(), &q, &[("Metadata", "true")]).await;
        assert_eq!(status, 200, "{param:?}: {body}");
        let fields: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            fields,
            [
                "access_token",
                "client_id",
                "expires_in",
                "expires_on",
                "ext_expires_in",
                "not_before",
                "resource",
                "token_type"
            ]
        );
        assert!(
            body.as_object().unwrap().values().all(Value::is_string),
            "{body}"
        );
        assert_eq!(body["resource"], AUD);
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["client_id"], who.client_id.as_str());
        let now = jsonwebtoken::get_current_timestamp();
        let expires_in = epoch(&body["expires_in"]);
        assert!((3590..=3600).contains(&expires_in), "{body}");
        assert!(
            epoch(&body["expires_on"]).abs_diff(now + expires_in) <= 1,
            "{body}"
        );
        assert!(epoch(&body["not_before"]) <= now, "{body}");

        let token = body["access_token"].as_str().unwrap();
        assert_eq!(
            epoch(&body["expires_on"]),
            decode_unverified(token).1["exp"]
        );
        let claims = use_token(&sim, token).await;
        assert_eq!(claims["aud"], AUD);
        assert_eq!(claims["oid"], who.object_id.as_str());
        assert_eq!(claims["appid"], who.client_id.as_str());
        assert_eq!(claims["xms_mirid"], who.mi_res_id.as_str());
    }

    // App Service / Container Apps.
    let secret = msi.identity_header();
    for (param, who) in [
        (None, &system),
        (Some(("client_id", ua.client_id.as_str())), &ua),
        (Some(("principal_id", ua.object_id.as_str())), &ua),
        (Some(("mi_res_id", ua.mi_res_id.as_str())), &ua),
    ] {
        let mut q = vec![("api-version", "2019-08-01"), ("resource", AUD)];
        q.extend(param);
        let (status, body) = get(
            &msi.app_service_url(),
            &q,
            &[("X-IDENTITY-HEADER", &secret)],
        )
        .await;
        assert_eq!(status, 200, "{param:?}: {body}");
        let fields: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            fields,
            [
                "access_token",
                "expires_on",
                "resource",
                "token_type",
                "client_id"
            ]
        );
        assert!(
            body.as_object().unwrap().values().all(Value::is_string),
            "{body}"
        );
        assert_eq!(body["client_id"], who.client_id.as_str());
        let claims = use_token(&sim, body["access_token"].as_str().unwrap()).await;
        assert_eq!(claims["oid"], who.object_id.as_str());
        assert_eq!(epoch(&body["expires_on"]), claims["exp"]);
    }
    assert_eq!(sim.bearer_tokens().len(), 8);

    // Shorter-lived tokens on demand, for refresh tests.
    msi.set_token_ttl(&idp, 5).await;
    let q = [("api-version", "2018-02-01"), ("resource", AUD)];
    let (_, body) = get(&msi.imds_url(), &q, &[("Metadata", "true")]).await;
    assert!(epoch(&body["expires_in"]) <= 5, "{body}");
    let claims = use_token(&sim, body["access_token"].as_str().unwrap()).await;
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        5
    );
}

#[tokio::test]
async fn requests_are_checked_the_way_azure_checks_them() {
    let idp = Idp::start().await;
    let ua = Identity::user_assigned("gateway-ua");
    let msi = Msi::start(&idp, std::slice::from_ref(&ua)).await;
    let imds = msi.imds_url();
    let app = msi.app_service_url();
    let secret = msi.identity_header();
    let ok_imds = [("api-version", "2018-02-01"), ("resource", AUD)];
    let ok_app = [("api-version", "2019-08-01"), ("resource", AUD)];
    let meta = [("Metadata", "true")];
    let invalid = |why: &str| json!({ "error": "invalid_request", "error_description": why });

    assert_eq!(
        get(&imds, &ok_imds, &[]).await,
        (400, invalid("Required metadata header not specified"))
    );
    assert_eq!(
        get(&imds, &ok_imds, &[("Metadata", "false")]).await,
        (400, invalid("Required metadata header not specified"))
    );
    let (status, body) = get(
        &imds,
        &ok_imds,
        &[("Metadata", "true"), ("X-Forwarded-For", "10.0.0.1")],
    )
    .await;
    assert_eq!((status, &body["error"]), (400, &json!("invalid_request")));
    for version in [None, Some("2019-08-01"), Some("2017-09-01")] {
        let mut q = vec![("resource", AUD)];
        q.extend(version.map(|v| ("api-version", v)));
        let (status, body) = get(&imds, &q, &meta).await;
        assert_eq!(
            (status, &body["error"]),
            (400, &json!("invalid_request")),
            "{version:?}"
        );
    }
    let (status, _) = get(&imds, &[("api-version", "2018-02-01")], &meta).await;
    assert_eq!(status, 400, "no resource");
    let unknown = [
        ("api-version", "2018-02-01"),
        ("resource", AUD),
        ("client_id", "00000000-0000-0000-0000-000000000000"),
    ];
    assert_eq!(
        get(&imds, &unknown, &meta).await,
        (400, invalid("Identity not found"))
    );
    let both = [
        ("api-version", "2018-02-01"),
        ("resource", AUD),
        ("client_id", ua.client_id.as_str()),
        ("object_id", ua.object_id.as_str()),
    ];
    assert_eq!(get(&imds, &both, &meta).await.0, 400);

    // App Service: the secret header, its own api-version and parameter names.
    assert_eq!(get(&app, &ok_app, &[]).await.0, 401);
    assert_eq!(
        get(&app, &ok_app, &[("X-IDENTITY-HEADER", "guess")])
            .await
            .0,
        401
    );
    assert_eq!(
        get(&app, &ok_app, &meta).await.0,
        401,
        "Metadata is not the secret"
    );
    let hdr = [("X-IDENTITY-HEADER", secret.as_str())];
    let old = [("api-version", "2018-02-01"), ("resource", AUD)];
    assert_eq!(get(&app, &old, &hdr).await.0, 400);
    let imds_name = [
        ("api-version", "2019-08-01"),
        ("resource", AUD),
        ("object_id", ua.object_id.as_str()),
    ];
    // `object_id` is IMDS's name: App Service ignores it and answers for the system identity.
    let (status, body) = get(&app, &imds_name, &hdr).await;
    assert_eq!(status, 200);
    assert_eq!(body["client_id"], msi.system_identity().client_id.as_str());
    let unknown = [
        ("api-version", "2019-08-01"),
        ("resource", AUD),
        ("principal_id", "00000000-0000-0000-0000-000000000000"),
    ];
    assert_eq!(
        get(&app, &unknown, &hdr).await,
        (400, invalid("Identity not found"))
    );
    let resp = common::http()
        .post(format!("{imds}?{}", form(&ok_imds)))
        .header("Metadata", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);

    // Outages: the endpoint's own, and the IdP's passed through.
    msi.set_status(Some(503));
    assert_eq!(get(&imds, &ok_imds, &meta).await.0, 503);
    assert_eq!(get(&app, &ok_app, &hdr).await.0, 503);
    msi.set_status(None);
    assert_eq!(get(&imds, &ok_imds, &meta).await.0, 200);
    idp.set_outage(&["token"], 429).await;
    assert_eq!(get(&imds, &ok_imds, &meta).await.0, 429);
    idp.set_down(false).await;

    // Everything was recorded, with what it was answered.
    let log = msi.requests();
    assert_eq!(log.len(), 20);
    let first = &log[0];
    assert_eq!(first.path, "/metadata/identity/oauth2/token");
    assert_eq!(first.query["resource"], AUD);
    assert_eq!(first.query["api-version"], "2018-02-01");
    assert!(first.headers.get("metadata").is_none());
    assert_eq!(first.status, 400);
    let last = log.last().unwrap();
    assert_eq!(last.headers["metadata"], "true");
    assert_eq!(last.status, 429);
    assert!(log.iter().any(|r| r.method == "POST" && r.status == 405));
}
