//! Compiles every kernel file of `cuda/` (and the crate's own test kernels) as C++ for the CPU,
//! against `shim/cuda_shim.h`, and generates the table that makes each kernel launchable by name.
//!
//! Each source gets a generated wrapper translation unit that includes the shim, then the source
//! inside a namespace of its own (so that helpers of different files that share a name cannot
//! silently replace each other at link time), then one `kernel_info` entry per kernel: the
//! trampoline that deduces the kernel's parameter types from its function pointer.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One kernel definition found in a source.
struct Kernel {
    name: String,
    line: usize,
}

/// A source file to compile, with the identifier its generated names use.
struct Source {
    path: PathBuf,
    id: String,
    kernels: Vec<Kernel>,
}

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cuda_dir = manifest_dir.join("../../cuda");
    let cuda_dir = cuda_dir.canonicalize().unwrap_or(cuda_dir);
    let shim_dir = manifest_dir.join("shim");
    println!("cargo:rerun-if-changed={}", cuda_dir.display());
    println!("cargo:rerun-if-changed={}", shim_dir.display());
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SMALLBATCH_EMU_UCONTEXT");

    let mut paths: Vec<PathBuf> = std::fs::read_dir(&cuda_dir)
        .unwrap_or_else(|e| panic!("cannot list the kernel directory {}: {e}", cuda_dir.display()))
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    paths.sort();
    let mut sources: Vec<Source> = paths.into_iter().map(|p| source(p, "cuda")).collect();
    sources.push(source(shim_dir.join("test_kernels.cu"), "shim"));

    let mut defined_in: BTreeMap<&str, &Path> = BTreeMap::new();
    for src in &sources {
        for k in &src.kernels {
            if let Some(first) = defined_in.insert(&k.name, &src.path) {
                panic!(
                    "kernel `{}` is defined in both {} and {}:{}; the emulator launches kernels by name",
                    k.name,
                    first.display(),
                    src.path.display(),
                    k.line
                );
            }
        }
    }

    let gen_dir = out_dir.join("emu");
    std::fs::create_dir_all(&gen_dir).expect("create the generated-source directory");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .include(&shim_dir)
        // The kernels are the subject of the tests: always optimised, also in debug builds.
        .opt_level(2)
        .flag("-std=c++17")
        // Bit-identical float results with the Rust core: no contraction into FMA, no fast math.
        .flag("-ffp-contract=off")
        .flag("-fno-fast-math")
        // The kernels' `#pragma unroll` is NVRTC's; GCC's spelling differs.
        .flag("-Wno-unknown-pragmas")
        .file(shim_dir.join("emu_runtime.cpp"));
    if std::env::var_os("SMALLBATCH_EMU_UCONTEXT").is_some_and(|v| !v.is_empty() && v != "0") {
        build.define("SMALLBATCH_EMU_UCONTEXT", None);
    }
    for src in &sources {
        let wrapper = gen_dir.join(format!("{}.cpp", src.id));
        write(&wrapper, &wrapper_source(src));
        build.file(wrapper);
    }
    let registry = gen_dir.join("registry.cpp");
    write(&registry, &registry_source(&sources));
    build.file(registry);
    build.compile("smallbatch_cuda_emu");
}

fn source(path: PathBuf, prefix: &str) -> Source {
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read kernel source {}: {e}", path.display()));
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("source");
    let id = format!("{prefix}_{}", stem.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
    let kernels = find_kernels(&text).unwrap_or_else(|(line, what)| panic!("{}:{line}: {what}", path.display()));
    Source { path, id, kernels }
}

/// A token of C++ source and the line it starts on.
#[derive(Debug, PartialEq)]
struct Token<'a> {
    text: &'a str,
    line: usize,
}

/// Identifiers, string literals and single punctuation characters, with comments removed.
/// Enough of C++'s lexical grammar to read kernel declarations.
fn tokens(src: &str) -> Vec<Token<'_>> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        match c {
            b'\n' => {
                line += 1;
                i += 1;
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                    line += usize::from(bytes[i] == b'\n');
                    i += 1;
                }
                i += 2;
            }
            b'"' | b'\'' => {
                i += 1;
                while i < bytes.len() && bytes[i] != c && bytes[i] != b'\n' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(bytes.len());
                out.push(Token { text: &src[start..i], line });
            }
            _ if c.is_ascii_alphanumeric() || c == b'_' => {
                // Numbers are read as one word too, digit separators (1'000) included.
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric()
                        || bytes[i] == b'_'
                        || (bytes[i] == b'\'' && bytes.get(i + 1).is_some_and(|b| b.is_ascii_alphanumeric())))
                {
                    i += 1;
                }
                out.push(Token { text: &src[start..i], line });
            }
            _ if c.is_ascii_whitespace() => i += 1,
            _ => {
                // One character, or one UTF-8 sequence outside comments (which C++ would reject).
                i += src[i..].chars().next().map_or(1, char::len_utf8);
                out.push(Token { text: &src[start..i], line });
            }
        }
    }
    out
}

/// The kernels of a source: every `extern "C" __global__ void name(`, with optional
/// `__launch_bounds__(...)` before or after `void`. Any other use of the qualifier is an error
/// (line, message): a kernel the emulator cannot launch by name must not go unnoticed.
fn find_kernels(src: &str) -> Result<Vec<Kernel>, (usize, String)> {
    const FORM: &str = "kernels must be declared as `extern \"C\" __global__ void name(...)`";
    let toks = tokens(src);
    let mut kernels = Vec::new();
    for (at, tok) in toks.iter().enumerate() {
        if tok.text != "__global__" {
            continue;
        }
        let before: Vec<&str> = toks[at.saturating_sub(2)..at].iter().map(|t| t.text).collect();
        if before != ["extern", "\"C\""] {
            return Err((tok.line, FORM.to_string()));
        }
        let mut rest = toks[at + 1..].iter().peekable();
        skip_launch_bounds(&mut rest);
        if rest.next().map(|t| t.text) != Some("void") {
            return Err((tok.line, FORM.to_string()));
        }
        skip_launch_bounds(&mut rest);
        match (rest.next(), rest.next()) {
            (Some(name), Some(paren))
                if paren.text == "("
                    && name.text.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    && name.text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                kernels.push(Kernel { name: name.text.to_string(), line: name.line });
            }
            _ => return Err((tok.line, FORM.to_string())),
        }
    }
    Ok(kernels)
}

fn skip_launch_bounds(rest: &mut std::iter::Peekable<std::slice::Iter<'_, Token<'_>>>) {
    if rest.next_if(|t| t.text == "__launch_bounds__").is_some() {
        let mut depth = 0;
        for t in rest.by_ref() {
            depth += i32::from(t.text == "(") - i32::from(t.text == ")");
            if depth == 0 {
                break;
            }
        }
    }
}

/// A C++ string literal of `text`.
fn cpp_string(text: &str) -> String {
    let mut lit = String::from("\"");
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                lit.push('\\');
                lit.push(c);
            }
            _ => lit.push(c),
        }
    }
    lit.push('"');
    lit
}

fn wrapper_source(src: &Source) -> String {
    let file_name = src.path.file_name().and_then(|f| f.to_str()).unwrap_or("?");
    let path = src.path.to_str().unwrap_or_else(|| panic!("kernel source path is not UTF-8: {}", src.path.display()));
    let mut out = String::new();
    writeln!(out, "// Generated by build.rs from {file_name}: its kernels compiled for the CPU, and their table.")
        .unwrap();
    writeln!(out, "#include \"cuda_shim.h\"\n").unwrap();
    writeln!(out, "namespace smallbatch_emu_src_{} {{", src.id).unwrap();
    writeln!(out, "#include {}", cpp_string(path)).unwrap();
    writeln!(out, "}}\n").unwrap();
    writeln!(out, "#include \"emu_launch.h\"\n").unwrap();
    if !src.kernels.is_empty() {
        writeln!(out, "extern const smallbatch_emu::KernelInfo smallbatch_emu_kernels_{}[] = {{", src.id).unwrap();
        for k in &src.kernels {
            writeln!(
                out,
                "    smallbatch_emu::kernel_info<&smallbatch_emu_src_{}::{}>({}),",
                src.id,
                k.name,
                cpp_string(&k.name)
            )
            .unwrap();
        }
        writeln!(out, "}};").unwrap();
    }
    out
}

fn registry_source(sources: &[Source]) -> String {
    let with_kernels: Vec<&Source> = sources.iter().filter(|s| !s.kernels.is_empty()).collect();
    let mut out = String::new();
    writeln!(out, "// Generated by build.rs: the kernel tables of every compiled source.").unwrap();
    writeln!(out, "#include \"emu_launch.h\"\n").unwrap();
    for src in &with_kernels {
        writeln!(out, "extern const smallbatch_emu::KernelInfo smallbatch_emu_kernels_{}[];", src.id).unwrap();
    }
    writeln!(out, "\nnamespace smallbatch_emu {{").unwrap();
    writeln!(out, "extern const KernelTable all_kernel_tables[] = {{").unwrap();
    for src in &with_kernels {
        writeln!(out, "    {{smallbatch_emu_kernels_{}, {}}},", src.id, src.kernels.len()).unwrap();
    }
    if with_kernels.is_empty() {
        writeln!(out, "    {{nullptr, 0}},").unwrap();
    }
    writeln!(out, "}};").unwrap();
    writeln!(out, "extern const std::size_t all_kernel_table_count = {};", with_kernels.len()).unwrap();
    writeln!(out, "}}  // namespace smallbatch_emu").unwrap();
    out
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
