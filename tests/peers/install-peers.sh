#!/usr/bin/env bash
# Installs the real peers some tests compare against, where that is possible without asking:
# root with Debian's apt (CI machines). Idempotent; prints what it did or why it skipped.
set -u
pkgs=(mrtrix3)
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "peers: not root with apt-get; tests needing ${pkgs[*]} will be skipped"; exit 0
fi
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && { echo "peers: ${pkgs[*]} already installed"; exit 0; }
export DEBIAN_FRONTEND=noninteractive
timeout 600 apt-get update -qq >/dev/null 2>&1 || true
timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
  && echo "peers: installed ${missing[*]}" || echo "peers: could not install ${missing[*]}; tests needing them will be skipped"
