#!/usr/bin/env bash
# Build the Docker images the docker backend, its tests and the benchmarks run, without any registry.
#
#   airflow-remote-ml/base:bookworm   debootstrap (minbase) Debian bookworm + python3 + python3-sklearn,
#                                     tarred and `docker import`ed: nothing is ever pulled
#   airflow-remote-ml/runner:latest   `docker build` of backends/docker/Dockerfile FROM the base
#   airflow-remote-ml/example:latest  the runner plus the example pipeline's code (example.Dockerfile)
#
# Fast on re-runs: each image carries a label with the hash of its recipe and is skipped when that
# hash is unchanged; the debootstrap tarball is cached under $CACHE_DIR keyed by the base recipe's
# hash, so a CI run on the same machine never re-runs debootstrap. From scratch it still works
# (it installs debootstrap if missing).
#
# The Debian mirror is the one apt is configured with here, read at run time from apt's sources
# (override with DEBIAN_MIRROR=<url>): this repository never names a host.
#
# Needs: root, a running engine (bash .ci/docker-engine.sh).
#
# Environment:
#   FORCE=1          rebuild both images even when their hashes match (the tarball cache is kept)
#   NO_CACHE=1       also ignore (and replace) the cached debootstrap tarball
#   CACHE_DIR        default /var/cache/airflow-remote-ml
#   DEBIAN_MIRROR    mirror URL for debootstrap; default: the first apt source serving $SUITE main
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

BASE_IMAGE="airflow-remote-ml/base:bookworm"
RUNNER_IMAGE="airflow-remote-ml/runner:latest"
EXAMPLE_IMAGE="airflow-remote-ml/example:latest"
HASH_LABEL="org.airflow-remote-ml.build-hash"
CACHE_DIR="${CACHE_DIR:-/var/cache/airflow-remote-ml}"

# ---- the base recipe: everything here (and the functions below) feeds the base hash ----
SUITE="bookworm"
VARIANT="minbase"
# python3-sklearn pulls numpy, scipy, joblib and threadpoolctl; OpenBLAS instead of the reference
# BLAS because model training spends its time in it. Our runtime is stdlib-only and is injected by
# the backend at run time, so nothing else belongs in the base.
PACKAGES="python3-sklearn libopenblas0-pthread"
# Debian's python3-scipy Depends on python3-pythran, a build-time compiler that drags in g++, boost
# and python3-dev (~600 MB) that scipy never uses at run time. A local stub package Provides it, so
# the dpkg database stays consistent and images built FROM the base can still apt-get install.
PYTHRAN_STUB="airflow-remote-ml-pythran-stub"

# ---- the example pipeline's code, COPYed into the runner at /opt/remote-ml/code ----
# Repo-relative files or directories, e.g. ("examples/ml_pipeline"). Each is copied into the build
# context's code/ directory, keeping its relative path. Empty until the example pipeline exists.
RUNNER_CODE_PATHS=()

say() { printf '[build-images] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap and docker import need it)"
command -v docker >/dev/null 2>&1 || die "docker CLI missing: run 'bash .ci/docker-engine.sh' first"
timeout 10 docker info >/dev/null 2>&1 || die "the Docker engine does not answer: run 'bash .ci/docker-engine.sh' first"

# The legacy builder: it is what a 20.10 daemon (Debian's docker.io) builds with, and it needs no
# buildx plugin, which newer CLIs otherwise require. It never pulls a FROM image that exists locally.
export DOCKER_BUILDKIT=0

# The first `deb` source (one-line *.list or deb822 *.sources) that serves "$SUITE" with component
# main; prints its URI. Comment lines and disabled stanzas are ignored.
apt_mirror() {
    local etc parts list
    etc="$(apt-config shell X Dir::Etc/d | sed -n "s/^X='\(.*\)'$/\1/p")"
    etc="${etc:-/etc/apt/}"
    list="$etc/$(apt-config shell X Dir::Etc::sourcelist | sed -n "s/^X='\(.*\)'$/\1/p")"
    parts="$etc/$(apt-config shell X Dir::Etc::sourceparts | sed -n "s/^X='\(.*\)'$/\1/p")"
    {
        [ -f "$list" ] && cat "$list"
        for f in "$parts"/*.list; do [ -f "$f" ] && cat "$f"; done
    } | awk -v suite="$SUITE" '
        /^[[:space:]]*#/ { next }
        $1 == "deb" {
            i = 2
            if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
            uri = $i; s = $(i + 1); main = 0
            for (j = i + 2; j <= NF; j++) if ($j == "main") main = 1
            if (s == suite && main) { print uri; exit }
        }'
    for f in "$parts"/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && suites ~ ("(^| )" suite "( |$)") \
                    && comps ~ /(^| )main( |$)/ && enabled !~ /^no$/ && uris != "") {
                    split(uris, u, " "); print u[1]; found = 1; exit
                }
                types = uris = suites = comps = enabled = ""
            }
            /^[[:space:]]*#/ { next }
            /^[[:space:]]*$/ { flush(); next }
            {
                key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^[[:space:]]+/, "")
                if (key == "types") types = $0
                else if (key == "uris") uris = $0
                else if (key == "suites") suites = $0
                else if (key == "components") comps = $0
                else if (key == "enabled") enabled = tolower($0)
            }
            END { if (!found) flush() }' "$f"
    done
}

# apt_get: apt-get that waits for another apt's lock (one copy, shared by the CI scripts).
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/../../.ci/apt.sh"

ensure_debootstrap() {
    if command -v debootstrap >/dev/null 2>&1 && [ -s /usr/share/keyrings/debian-archive-keyring.gpg ]; then
        return
    fi
    say "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
    apt_get update -qq
    apt_get install -y -qq --no-install-recommends debootstrap debian-archive-keyring >/dev/null
}

# Make the root file system small: no apt lists or package cache, no docs, man pages or translations
# (copyright files stay), and a dpkg config that keeps them out of images built FROM this one too.
slim_rootfs() {
    local root="$1"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
        "$root"/var/log/* "$root"/tmp/* "$root"/var/tmp/*
    find "$root"/usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
    find "$root"/usr/share/doc -mindepth 1 -type d -empty -delete
    rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
        "$root"/usr/share/lintian "$root"/usr/share/linda
    # The test suites of numpy/scipy/sklearn are a large share of the image and never run in a step.
    find "$root"/usr/lib/python3/dist-packages -type d -name tests -prune -exec rm -rf {} +
    # Docker supplies these per container; the host's copies must not leak into the image.
    rm -f "$root"/etc/resolv.conf "$root"/etc/hostname
    mkdir -p "$root"/etc/dpkg/dpkg.cfg.d
    cat >"$root"/etc/dpkg/dpkg.cfg.d/01-airflow-remote-ml-slim <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
    cat >"$root"/etc/apt/apt.conf.d/01-airflow-remote-ml-slim <<'EOF'
APT::Install-Recommends "false";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
EOF
}

# A package that only Provides python3-pythran (see PYTHRAN_STUB), built with the target's dpkg-deb.
install_pythran_stub() {
    local root="$1" pkg="$1/tmp/$PYTHRAN_STUB"
    mkdir -p "$pkg/DEBIAN"
    cat >"$pkg/DEBIAN/control" <<EOF
Package: $PYTHRAN_STUB
Version: 1.0
Architecture: all
Maintainer: airflow-remote-ml <noreply@invalid>
Provides: python3-pythran
Description: stands in for python3-pythran
 python3-pythran is a build-time compiler that python3-scipy does not use at run time.
EOF
    chroot "$root" dpkg-deb --root-owner-group --build "/tmp/$PYTHRAN_STUB" "/tmp/$PYTHRAN_STUB.deb" >/dev/null
    chroot "$root" dpkg -i "/tmp/$PYTHRAN_STUB.deb" >/dev/null
    rm -rf "$pkg" "$pkg.deb"
}

# debootstrap a minimal system with python3, then apt-get the ML packages inside it (so the stub can
# satisfy scipy's python3-pythran), slim it, and write it as an uncompressed tarball (docker import
# reads that fastest; disk is not the constraint here).
make_base_tarball() {
    local out="$1" mirror work root t0=$SECONDS
    mirror="${DEBIAN_MIRROR:-$(apt_mirror | head -n 1)}"
    [ -n "$mirror" ] || die "no apt source serves '$SUITE main'; set DEBIAN_MIRROR=<debian mirror url>"
    ensure_debootstrap
    work="$(mktemp -d /var/tmp/airflow-remote-ml-rootfs.XXXXXX)"
    root="$work/root"
    # debootstrap and we mount /proc (and debootstrap /sys) inside the target; a failure can leave
    # them mounted, and rm -rf must never descend into a live /proc or /sys.
    trap 'umount -l "'"$root"'/proc" "'"$root"'/sys" 2>/dev/null || true; rm -rf --one-file-system "'"$work"'"' EXIT
    say "debootstrap --variant=$VARIANT --include=python3 $SUITE (mirror read from apt's sources)"
    if ! debootstrap --variant="$VARIANT" --include=python3 "$SUITE" "$root" "$mirror" \
        >"$work/debootstrap.log" 2>&1; then
        tail -n 30 "$work/debootstrap.log" >&2
        [ -f "$root/debootstrap/debootstrap.log" ] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
        die "debootstrap failed"
    fi
    say "debootstrap took $((SECONDS - t0))s"
    install_pythran_stub "$root"
    say "apt-get install $PACKAGES (inside the new root)"
    mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
    # debootstrap copied the host's resolv.conf in, so apt inside the chroot resolves the mirror. This apt
    # needs no lock wait: its locks are the new root's own (/var/lib/dpkg and /var/lib/apt/lists under a
    # fresh mktemp directory), which no other process can hold. (Left as it is, too, because this function's
    # text is part of the base image's recipe hash: a change would rebuild the base from the mirror.)
    if ! chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $PACKAGES" \
        >"$work/apt.log" 2>&1; then
        tail -n 30 "$work/apt.log" >&2
        die "apt-get install $PACKAGES failed inside the new root"
    fi
    umount -l "$root/proc" "$root/sys" 2>/dev/null || true
    say "debootstrap + apt-get took $((SECONDS - t0))s"
    slim_rootfs "$root"
    mkdir -p "$(dirname "$out")"
    tar --numeric-owner --one-file-system -C "$root" -cf "$out.partial" .
    mv "$out.partial" "$out"
    rm -rf --one-file-system "$work"
    trap - EXIT
}

image_hash() {
    docker image inspect --format "{{ index .Config.Labels \"$HASH_LABEL\" }}" "$1" 2>/dev/null || true
}

build_base() {
    local hash tarball
    hash="$(printf '%s\n' "$SUITE" "$VARIANT" "$PACKAGES" "$(declare -f slim_rootfs install_pythran_stub make_base_tarball)" \
        | sha256sum | cut -c1-16)"
    if [ -z "${FORCE:-}" ] && [ "$(image_hash "$BASE_IMAGE")" = "$hash" ]; then
        say "$BASE_IMAGE is up to date (recipe $hash)"
        return
    fi
    tarball="$CACHE_DIR/base-$SUITE-$hash.tar"
    if [ -n "${NO_CACHE:-}" ] || [ ! -s "$tarball" ]; then
        make_base_tarball "$tarball"
        # Older recipes' tarballs are dead weight once this one exists.
        find "$CACHE_DIR" -maxdepth 1 -name "base-$SUITE-*.tar" ! -name "$(basename "$tarball")" -delete
    else
        say "using cached root file system $tarball"
    fi
    say "docker import $tarball -> $BASE_IMAGE"
    docker import \
        --change "LABEL $HASH_LABEL=$hash" \
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "ENV LANG=C.UTF-8" \
        --change 'CMD ["/bin/bash"]' \
        "$tarball" "$BASE_IMAGE" >/dev/null
}

# The build context is staged in a scratch directory holding only the Dockerfile and code/, so a
# build never sends the whole repository to the daemon.
stage_runner_context() {
    local ctx="$1" p
    cp "$SCRIPT_DIR/Dockerfile" "$ctx/Dockerfile"
    mkdir -p "$ctx/code"
    for p in "${RUNNER_CODE_PATHS[@]+"${RUNNER_CODE_PATHS[@]}"}"; do
        [ -e "$REPO_ROOT/$p" ] || die "RUNNER_CODE_PATHS names '$p', which does not exist"
        mkdir -p "$ctx/code/$(dirname "$p")"
        cp -a "$REPO_ROOT/$p" "$ctx/code/$p"
    done
    # __pycache__ and the like would make the hash, and the image, depend on what ran locally.
    find "$ctx/code" \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +
}

stage_example_context() {
    local ctx="$1"
    cp "$SCRIPT_DIR/example.Dockerfile" "$ctx/Dockerfile"
    cp -a "$REPO_ROOT/dags/example_ml" "$ctx/example_ml"
    find "$ctx" \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +
}

# build_image IMAGE FROM_IMAGE STAGE_FUNCTION: `docker build` a context staged by STAGE_FUNCTION, unless
# the image already carries the hash of its recipe. The hash covers the parent image, every file of the
# context (names and contents) and the recipe functions, so any change to them rebuilds the image.
build_image() {
    local image="$1" parent="$2" stage="$3" ctx hash parent_id
    ctx="$(mktemp -d /var/tmp/airflow-remote-ml-ctx.XXXXXX)"
    trap 'rm -rf "'"$ctx"'"' EXIT
    "$stage" "$ctx"
    parent_id="$(docker image inspect --format '{{.Id}}' "$parent")"
    hash="$(
        {
            printf '%s\n' "$parent_id" "$(declare -f build_image "$stage")"
            (cd "$ctx" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
        } | sha256sum | cut -c1-16
    )"
    if [ -z "${FORCE:-}" ] && [ "$(image_hash "$image")" = "$hash" ]; then
        say "$image is up to date (recipe $hash)"
    else
        say "docker build -> $image"
        # --pull=false: the parent exists only locally; --network=none: no RUN step needs the network.
        # Its output is only shown on failure: newer CLIs print a legacy-builder deprecation notice.
        if ! docker build --pull=false --network=none --force-rm \
            --label "$HASH_LABEL=$hash" \
            -t "$image" "$ctx" >"$ctx.log" 2>&1; then
            cat "$ctx.log" >&2
            rm -f "$ctx.log"
            die "docker build of $image failed"
        fi
        rm -f "$ctx.log"
    fi
    rm -rf "$ctx"
    trap - EXIT
}

main() {
    local t0=$SECONDS
    # Two builds at once (a developer and a CI run on one machine) would race on the tarball and tags.
    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/build.lock"
    flock 9
    build_base
    build_image "$RUNNER_IMAGE" "$BASE_IMAGE" stage_runner_context
    build_image "$EXAMPLE_IMAGE" "$RUNNER_IMAGE" stage_example_context
    # Images replaced by a rebuild linger untagged; drop ours (dangling ones only).
    docker image prune -f --filter "label=$HASH_LABEL" >/dev/null 2>&1 || true
    say "done in $((SECONDS - t0))s:"
    docker image ls --format '  {{.Repository}}:{{.Tag}}  {{.ID}}  {{.Size}}' airflow-remote-ml/base >&2
    docker image ls --format '  {{.Repository}}:{{.Tag}}  {{.ID}}  {{.Size}}' airflow-remote-ml/runner >&2
    docker image ls --format '  {{.Repository}}:{{.Tag}}  {{.ID}}  {{.Size}}' airflow-remote-ml/example >&2
}

main "$@"
