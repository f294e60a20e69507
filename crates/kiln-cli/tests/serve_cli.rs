//! `kiln serve` as a user runs it: the small model on 127.0.0.1 (the default host) at
//! a free port, its greedy completion against `kiln generate`'s text, the API key.

mod common;
use common::{kiln_command, kiln_ok, small_model};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};

/// A running `kiln serve`, killed when dropped.
struct Served {
    child: Child,
    base: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `kiln serve ARGS --port 0` and reads the address it prints.
fn serve(args: &[&str]) -> Served {
    let child = kiln_command(&["serve", "--port", "0", "--device", "cpu"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln serve starts");
    // Killed and waited for on every path from here, by Drop.
    let mut served = Served {
        child,
        base: String::new(),
    };
    let stderr = served.child.stderr.take().unwrap();
    let mut said = String::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        said.push_str(&line);
        said.push('\n');
        if let Some(rest) = line.split("on http://").nth(1) {
            let address = rest.split_whitespace().next().unwrap();
            served.base = format!("http://{address}");
            return served;
        }
    }
    panic!("kiln serve ended without serving: {said}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn serves_the_greedy_text_of_kiln_generate_on_localhost() {
    let model = small_model("serve_cli-small.gguf");
    let served = serve(&["-m", model]);
    assert!(
        served.base.starts_with("http://127.0.0.1:"),
        "{}",
        served.base
    );
    let (generated, _) = kiln_ok(&[
        "generate", "-m", model, "-p", "ROMEO:", "-n", "12", "--temp", "0", "--device", "cpu",
    ]);
    let body: Value = runtime().block_on(async {
        let client = reqwest::Client::new();
        let health = client
            .get(format!("{}/health", served.base))
            .send()
            .await
            .unwrap();
        assert!(health.status().is_success());
        client
            .post(format!("{}/v1/completions", served.base))
            .body(r#"{"prompt": "ROMEO:", "max_tokens": 12, "temperature": 0}"#)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let text = body["choices"][0]["text"].as_str().unwrap();
    // `kiln generate` prints the prompt, the generated text and a newline.
    assert_eq!(format!("ROMEO:{text}\n"), generated);
    assert_eq!(body["usage"]["completion_tokens"], 12);
}

#[test]
fn the_api_key_flag_guards_the_api() {
    let model = small_model("serve_cli-small.gguf");
    let served = serve(&["-m", model, "--api-key", "sekret", "--alias", "tiny"]);
    runtime().block_on(async {
        let client = reqwest::Client::new();
        let models = format!("{}/v1/models", served.base);
        let refused = client.get(&models).send().await.unwrap();
        assert_eq!(refused.status(), reqwest::StatusCode::UNAUTHORIZED);
        let list: Value = client
            .get(&models)
            .bearer_auth("sekret")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(list["data"][0]["id"], "tiny");
    });
}
