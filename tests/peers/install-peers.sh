#!/usr/bin/env bash
# Installs the real peers some tests compare against, where that is possible without asking:
# root with Debian's apt (CI machines). Idempotent; prints what it did or why it skipped.
#   mrtrix3                    a second DTI reference (tests/test_dwi.py)
#   munge slurm* mariadb       a local SLURM cluster (tests/test_slurm.py starts it: tests/slurm/start-local-slurm.sh)
# Each group is installed on its own, so one that is unavailable does not keep the other out.
set -u
groups=("mrtrix3" "munge slurmctld slurmd slurm-client slurmdbd mariadb-server")
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "peers: not root with apt-get; tests needing ${groups[*]} will be skipped"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# dpkg -s also succeeds for removed packages whose config files remain: ask for "install ok installed".
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
updated=0
for group in "${groups[@]}"; do
  read -r -a pkgs <<<"$group"
  missing=()
  for p in "${pkgs[@]}"; do installed "$p" || missing+=("$p"); done
  if [ ${#missing[@]} -eq 0 ]; then echo "peers: ${pkgs[*]} already installed"; continue; fi
  [ "$updated" = 1 ] || { timeout 600 apt-get update -qq >/dev/null 2>&1 || true; updated=1; }
  # Keep the packages' own services (munge, mariadb, slurm*) from starting where no policy says so already:
  # the tests start what they need, under their own state folder.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; own_policy=1; fi
  timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    && echo "peers: installed ${missing[*]}" || echo "peers: could not install ${missing[*]}; tests needing them will be skipped"
  [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
done
exit 0
