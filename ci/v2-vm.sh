#!/usr/bin/env bash
# ci/v2-vm.sh: the cgroup tests on a real, pure cgroup v2 kernel.
#
# Boots Debian's kernel in qemu (software emulation, TCG: a KVM guest hangs on
# the CI machines) through virtme-ng, which shares this machine's filesystem
# read-only with the guest (/tmp and the repo as throw-away overlays) and
# mounts cgroup2 alone (cgroup_no_v1=all). The test binaries are built here,
# on the host, and run in the guest as root, in three placements:
#
#   delegated  the test process in a leaf of /ci.service, each test daemon in a
#              cgroup of its own below it: systemd's Delegate=yes.
#   namespace  the same inside a cgroup namespace rooted at /ctr, with cgroup2
#              mounted afresh: what `docker run --cgroupns=private` gives.
#   root       the few tests that need daemons sharing one cgroup (a second
#              daemon on the same parent; crash recovery by the next daemon),
#              in the root cgroup.
#
# Usage: bash ci/v2-vm.sh   (as root; installs what it lacks, idempotently)
# Env:   SESSIOND_V2_PROFILE=debug|release (debug: CI has just built it)
#        SESSIOND_V2_TIMEOUT=seconds for the whole VM (default 1080)
#        SESSIOND_V2_KERNEL=/boot/vmlinuz-... (default: the newest there)
# Exit:  0 when every test passed; 1 when one failed; 2 when the VM or the
#        setup failed. Logs of a failed run are kept and their path printed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
say() { echo "[v2-vm] $*" >&2; }
die() { say "error: $*"; exit 2; }
T0=$(date +%s)
[ "$(id -u)" = 0 ] || die "run as root (apt-get; the guest runs the tests as root)"

PROFILE=${SESSIOND_V2_PROFILE:-debug}
VM_TIMEOUT=${SESSIOND_V2_TIMEOUT:-1080}
VENV=${SESSIOND_V2_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sessiond-v2-vm/venv}
VIRTME_NG=virtme-ng==1.42

# ------------------------------------------------------------ what it needs
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
compgen -G '/boot/vmlinuz-*' >/dev/null || need+=(linux-image-amd64)
command -v busybox >/dev/null || need+=(busybox-static)
if ((${#need[@]})); then
  say "installing ${need[*]} (apt-get)"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
    --no-install-recommends "${need[@]}" >&2
fi
if [ ! -x "$VENV/bin/vng" ]; then
  say "installing $VIRTME_NG (pip, into $VENV)"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q "$VIRTME_NG" >&2
fi
# vng runs virtme-run and virtme-ng-init's helpers from PATH.
export PATH="$VENV/bin:$PATH"
KERNEL=${SESSIOND_V2_KERNEL:-$(ls /boot/vmlinuz-* | sort -V | tail -n1)}
[ -r "$KERNEL" ] || die "no kernel image $KERNEL"
KVER=${KERNEL##*/vmlinuz-}
[ -d "/lib/modules/$KVER" ] || die "no /lib/modules/$KVER (virtio, 9p and overlay modules)"

# ------------------------------------------------------------ the test binaries
# Built here; the guest runs them where they are. They embed the absolute path
# of target/<profile>/sessiond (CARGO_BIN_EXE_sessiond), which the guest sees too.
BINS=(v2_guest cgroups limits fault_commands fault_signals)
cargo_args=(test --no-run --message-format=json)
[ "$PROFILE" = release ] && cargo_args+=(--release)
for b in "${BINS[@]}"; do cargo_args+=(--test "$b"); done
say "building ${BINS[*]} ($PROFILE)"
EXES=$(cargo "${cargo_args[@]}" | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
')
for b in "${BINS[@]}"; do
  grep -q "^$b " <<<"$EXES" || die "no test binary for $b"
done

# ------------------------------------------------------------ the guest's script
RUN=$(mktemp -d /tmp/sessiond-v2-vm.XXXXXX)
chmod 755 "$RUN"
printf '%s\n' "$EXES" > "$RUN/binaries"
cat > "$RUN/guest.sh" <<'GUEST'
#!/bin/bash
# Runs as root inside the VM (virtme-ng's init, no systemd): every process
# starts in the root cgroup.
set -u
RUN=$1 CG=/sys/fs/cgroup
fail=0
[ "$(stat -fc %T $CG)" = cgroup2fs ] || { echo "guest: $CG is not cgroup2"; echo 2 > $RUN/exit; exit 2; }
echo "guest: kernel $(uname -r); root controllers: $(cat $CG/cgroup.controllers)"
echo "+memory +cpu +pids" > $CG/cgroup.subtree_control
# Cores in the cwd, as on the CI host (limits' core test).
echo core > /proc/sys/kernel/core_pattern
export SESSIOND_V2_GUEST=1 HOME=/root

# Tests left to a placement other than the delegated ones, each with why.
DELEGATED_SKIPS=(
  "sigkill_under_load_then_restart_removes_what_the_dead_daemon_left|after a crash, the supervisor empties a delegated cgroup (systemd does): the next daemon's own recovery runs at the root"
  "a_second_daemon_on_the_same_cgroup_parent_refuses_to_start|daemons in cgroups of their own never share a parent: runs at the root"
)
# Tests no placement here runs, each with why (the host runs them).
GUEST_SKIPS=(
  "sigterm_under_load_drains_then_ends_everything_cleanly|timing: seen failing once in two runs under emulation (a flooding command answered INTERNAL instead of killed_by shutdown: its actor was stopped before it recorded its end; the suspect is the shutdown's wall-clock destroy deadline, kill_grace + 10 s); the host runs it, and sigterm_while_commands_stream_gives_every_streamer_its_end runs here"
  "as_subreaper_orphans_are_reaped_and_exit_codes_stay_right|a burst of 200 commands: minutes of CPU under emulation, and nothing cgroup-specific"
)
ROOT_ONLY=(
  "fault_signals sigkill_under_load_then_restart_removes_what_the_dead_daemon_left"
  "cgroups a_second_daemon_on_the_same_cgroup_parent_refuses_to_start"
)

# run_bin PLACEMENT NAME [test args...]
run_bin() {
  local placement=$1 name=$2; shift 2
  local exe; exe=$(awk -v n="$name" '$1 == n { print $2 }' $RUN/binaries)
  local log=$RUN/$placement-$name.log s e rc
  s=$(date +%s)
  timeout 600 "$exe" "$@" > "$log" 2>&1; rc=$?
  e=$(date +%s)
  printf '%-10s %-15s rc=%-3s %4ss  %s\n' "$placement" "$name" "$rc" "$((e - s))" \
    "$(grep -E '^(test result|SKIP)' "$log" | tail -n1)" | tee -a $RUN/summary
  if [ $rc != 0 ]; then
    fail=1
    echo "---- $placement/$name: failures (full log in the run directory) ----"
    sed -n '/^failures:/,$p' "$log" | head -n 150
    grep -q '^failures:' "$log" || tail -n 40 "$log"
  fi
}

# run_placement PLACEMENT: every binary, the delegated skips applied.
run_placement() {
  local skip=() item
  for item in "${DELEGATED_SKIPS[@]}" "${GUEST_SKIPS[@]}"; do
    skip+=(--skip "${item%%|*}")
    echo "SKIP in $1: ${item%%|*}: ${item#*|}"
  done
  run_bin "$1" v2_guest
  for name in cgroups limits fault_commands fault_signals; do
    run_bin "$1" "$name" --include-ignored --skip measure_ "${skip[@]}"
  done
}

# delegated: /ci.service holds no process; the test process sits in its leaf
# `runner`, each test daemon gets /ci.service/d-<tag> (tests/support).
mkdir $CG/ci.service $CG/ci.service/runner
echo $$ > $CG/ci.service/runner/cgroup.procs
echo "+memory +cpu +pids" > $CG/ci.service/cgroup.subtree_control
SESSIOND_TEST_DELEGATE=$CG/ci.service run_placement delegated

# namespace: a cgroup namespace rooted at /ctr, cgroup2 mounted afresh; inside
# it the same layout at its root (which must hold no process: the test
# process moves into its leaf `runner` first).
mkdir $CG/ctr
export -f run_bin run_placement
export RUN DELEGATED_SKIPS_TEXT="$(printf '%s\n' "${DELEGATED_SKIPS[@]}")"
export GUEST_SKIPS_TEXT="$(printf '%s\n' "${GUEST_SKIPS[@]}")"
(
  echo $BASHPID > $CG/ctr/cgroup.procs
  exec unshare --cgroup --mount --propagation private bash -c '
    set -u
    CG=/sys/fs/cgroup fail=0
    mapfile -t DELEGATED_SKIPS <<<"$DELEGATED_SKIPS_TEXT"
    mapfile -t GUEST_SKIPS <<<"$GUEST_SKIPS_TEXT"
    umount $CG && mount -t cgroup2 cgroup2 $CG || exit 2
    echo "namespace: /proc/self/cgroup says $(cat /proc/self/cgroup)"
    mkdir $CG/runner && echo $$ > $CG/runner/cgroup.procs
    echo "+memory +cpu +pids" > $CG/cgroup.subtree_control || exit 2
    SESSIOND_TEST_DELEGATE=$CG run_placement namespace
    exit $fail'
)
rc=$?; [ $rc = 0 ] || fail=1

# root: daemons sharing the root cgroup (exempt from the no-internal-processes rule).
echo $$ > $CG/cgroup.procs
for item in "${ROOT_ONLY[@]}"; do
  run_bin root ${item% *} --include-ignored --exact ${item#* }
done
echo $fail > $RUN/exit
GUEST
chmod +x "$RUN/guest.sh"

# ------------------------------------------------------------ boot and run
say "booting $KVER under qemu (TCG); logs in $RUN"
T1=$(date +%s)
set +e
# (virtme's console channel ends in NUL bytes: stripped.)
timeout -k 10 "$VM_TIMEOUT" "$VENV/bin/vng" --run "$KERNEL" --disable-kvm \
  --memory 3G --cpus 2 --rwdir="$RUN" --overlay-rwdir="$ROOT" --cwd "$ROOT" \
  --append "cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1" \
  --exec "$RUN/guest.sh $RUN" </dev/null 2>&1 | tr -d '\000'
VRC=${PIPESTATUS[0]}
set -e
T2=$(date +%s)
if [ -s "$RUN/exit" ]; then RC=$(cat "$RUN/exit"); else RC=2; fi
[ "$VRC" = 124 ] && say "the VM timed out after ${VM_TIMEOUT}s"
say "VM $((T2 - T1)) s; whole script $((T2 - T0)) s; result $RC"
if [ "$RC" = 0 ]; then rm -rf "$RUN"; else say "logs kept in $RUN"; fi
exit "$RC"
