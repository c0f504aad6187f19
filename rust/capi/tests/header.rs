//! The committed header, include/smallbatch.h, must be what cbindgen generates from the sources
//! today. To regenerate it after changing the C API:
//!
//!     SMALLBATCH_BLESS=1 cargo test --release -p smallbatch-capi --test header

use std::path::Path;

#[test]
fn header_is_up_to_date() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen cannot generate the header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("the header is UTF-8");

    let path = crate_dir.join("include").join("smallbatch.h");
    if std::env::var_os("SMALLBATCH_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("cannot write the header");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let line = committed.lines().zip(generated.lines()).position(|(a, b)| a != b);
        panic!(
            "{} is stale (first difference at line {}). Regenerate it with\n    \
             SMALLBATCH_BLESS=1 cargo test --release -p smallbatch-capi --test header\nand commit it.",
            path.display(),
            line.map_or_else(|| "the end".to_string(), |l| (l + 1).to_string()),
        );
    }
}
