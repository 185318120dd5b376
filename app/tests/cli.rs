//! `studio generate` as a person runs it, on the tiny fixture models.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use studio::gallery::metadata::read_metadata;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("studio-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn studio(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_studio"))
        .args(args)
        .env("STUDIO_BACKEND", "cpu")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn writes_a_png_whose_metadata_round_trips() {
    let dir = scratch("roundtrip");
    let out = dir.join("fox.png");
    let model = fixture("sd1");
    let output = studio(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red fox, snow",
        "--negative",
        "blurry",
        "--seed",
        "1234",
        "--steps",
        "3",
        "--cfg",
        "6.5",
        "--width",
        "64",
        "--height",
        "64",
        "--sampler",
        "dpmpp_2m",
        "--schedule",
        "karras",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("seed: 1234"));
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(
        image::load_from_memory(&bytes)
            .unwrap()
            .to_rgb8()
            .dimensions(),
        (64, 64)
    );
    let found = read_metadata(&bytes).unwrap().expect("metadata");
    let r = found.request;
    assert_eq!(
        (r.prompt.as_str(), r.negative_prompt.as_str()),
        ("a red fox, snow", "blurry")
    );
    assert_eq!(
        (found.seed, r.steps, r.cfg_scale, r.width, r.height),
        (1234, 3, 6.5, 64, 64)
    );
    assert_eq!(r.sampler.id(), "dpmpp_2m");
    assert_eq!(r.schedule.id(), "karras");
}

#[test]
fn a_random_seed_is_printed_and_reproduces_the_image() {
    let dir = scratch("seed");
    let model = fixture("sd1.safetensors");
    let first = dir.join("a.png");
    let common = [
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a boat",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
    ];
    let output = studio(
        &[
            &["generate"][..],
            &common,
            &["--out", first.to_str().unwrap()],
        ]
        .concat(),
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let seed = text(&output.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("seed: ").map(str::to_owned))
        .expect("the seed is printed");
    let second = dir.join("b.png");
    let output = studio(
        &[
            &["generate"][..],
            &common,
            &["--seed", &seed, "--out", second.to_str().unwrap()],
        ]
        .concat(),
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    assert_eq!(pixels(&first), pixels(&second));
}

#[test]
fn refuses_to_overwrite_unless_asked() {
    let dir = scratch("overwrite");
    let out = dir.join("taken.png");
    std::fs::write(&out, b"precious").unwrap();
    let model = fixture("sd1");
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        out.to_str().unwrap(),
    ];
    let output = studio(&args);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("already exists"),
        "{}",
        text(&output.stderr)
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let output = studio(&[&args[..], &["--overwrite"]].concat());
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(image::open(&out).is_ok());
}

#[test]
fn interrupt_cancels_and_leaves_no_file() {
    let dir = scratch("interrupt");
    let out = dir.join("never.png");
    let model = fixture("sd1");
    let mut child = Command::new(env!("CARGO_BIN_EXE_studio"))
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a long job",
            "--steps",
            "500",
            "--width",
            "64",
            "--height",
            "64",
            "--out",
            out.to_str().unwrap(),
        ])
        .env("STUDIO_BACKEND", "cpu")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "exited before any step: {seen}"
        );
        seen.push_str(&line);
        if line.starts_with("step ") {
            break;
        }
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}{rest}");
    assert!(rest.contains("cancelled"), "{rest}");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = scratch("bad");
    let out = dir.join("x.png");
    let out = out.to_str().unwrap();
    let model = fixture("sd1");
    let model = model.to_str().unwrap();
    let not_an_image = dir.join("notes.png");
    std::fs::write(&not_an_image, b"not a png").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--steps", "0"], "steps"),
        (
            vec![
                "--strength",
                "1.5",
                "--init",
                not_an_image.to_str().unwrap(),
            ],
            "cannot read the image",
        ),
        (
            vec!["--mask", not_an_image.to_str().unwrap()],
            "--mask needs --init",
        ),
        (vec!["--sampler", "heun"], "unknown sampler"),
        (vec!["--outpaint", "8,8"], "four numbers"),
        (vec!["--width", "100000"], "outside"),
    ];
    for (extra, expected) in cases {
        let args = [
            &["generate", "--model", model, "--prompt", "x", "--out", out][..],
            &extra,
        ]
        .concat();
        let output = studio(&args);
        assert!(!output.status.success(), "{extra:?} succeeded");
        assert!(
            text(&output.stderr).contains(expected),
            "{extra:?}: {}",
            text(&output.stderr)
        );
    }
    let pickle = dir.join("model.ckpt");
    std::fs::write(&pickle, b"\x80\x02.").unwrap();
    let output = studio(&[
        "generate",
        "--model",
        pickle.to_str().unwrap(),
        "--prompt",
        "x",
        "--out",
        out,
    ]);
    assert!(
        text(&output.stderr).contains("pickle"),
        "{}",
        text(&output.stderr)
    );
    let output = studio(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt",
        "x",
        "--out",
        out,
    ]);
    assert!(
        text(&output.stderr).contains("no such file"),
        "{}",
        text(&output.stderr)
    );
    assert!(!Path::new(out).exists());
}
