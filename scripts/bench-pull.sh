#!/usr/bin/env bash
# Pull and push benchmark against a loopback registry (Debian's
# docker-registry), all in one run: `rmount pull` (into an empty store,
# indexing every layer as it streams) vs `skopeo copy docker://… oci:…`
# (into an empty OCI layout), and `rmount push` vs `skopeo copy oci:…
# docker://…` into an empty registry, for the Debian rootfs image and the
# 50k-file synthetic image (scripts/make-images.sh). Prints a table of
# medians and writes it to its own section of docs/benchmarks.md.
# Needs root. RUNS=N sets the repetitions (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh
bench_init

# A registry of its own, restarted empty before every push run.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
reg=127.0.0.1:$port
cat > "$WORK/registry.yml" <<YML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $WORK/registry}, delete: {enabled: true}}
http: {addr: $reg}
YML
cat > "$WORK/restart-registry.sh" <<SH
#!/usr/bin/env bash
# Stops the benchmark registry (if running), empties it and starts it again.
set -euo pipefail
[[ -f $WORK/registry.pid ]] && kill \$(cat $WORK/registry.pid) 2>/dev/null && sleep 0.2
rm -rf $WORK/registry
docker-registry serve $WORK/registry.yml > $WORK/registry.log 2>&1 &
echo \$! > $WORK/registry.pid
for _ in \$(seq 100); do curl -s -o /dev/null http://$reg/v2/ && exit 0; sleep 0.05; done
echo "registry did not start" >&2; exit 1
SH
chmod +x "$WORK/restart-registry.sh"
stop_registry() { [[ -f $WORK/registry.pid ]] && kill "$(cat "$WORK/registry.pid")" 2>/dev/null || true; }
trap 'stop_registry; bench_cleanup' EXIT
"$WORK/restart-registry.sh"

skopeo_push() { # LAYOUT TAG NAME
  skopeo copy -q --dest-tls-verify=false "oci:$1:$2" "docker://$reg/$3:$2"
}

ROWS=()
add_row() { # workload skopeo rmount
  local line="| $1 | $2 | $3 | $(ratio "$3" "$2")× |"
  ROWS+=("$line")
  echo "$line"
}

for spec in debian:demo synthetic:bench; do
  name=${spec%%:*} tag=${spec#*:}
  layout=$(scripts/make-images.sh "$name")
  mib=$(calc "'%.0f' % ($(du -sb "$layout" | cut -f1) / 1048576)")
  label="$name ($mib MiB compressed)"

  # Pull: the registry holds the image; each run starts from an empty destination.
  "$WORK/restart-registry.sh"
  skopeo_push "$layout" "$tag" "$name"
  t_sk=$(median "skopeo copy -q --src-tls-verify=false docker://$reg/$name:$tag oci:$WORK/sk:$tag" \
    "rm -rf '$WORK/sk'")
  t_rm=$(median "'$RMOUNT' --root '$WORK/pulled' pull -q $reg/$name:$tag > /dev/null" \
    "rm -rf '$WORK/pulled'")
  add_row "pull $label" "$t_sk" "$t_rm"

  # Push: each run starts from an empty registry.
  ref=$(rmount_load "$WORK/local" "$layout" "$tag")
  t_sk=$(median "skopeo copy -q --dest-tls-verify=false oci:$layout:$tag docker://$reg/$name:$tag" \
    "'$WORK/restart-registry.sh'")
  t_rm=$(median "'$RMOUNT' --root '$WORK/local' push -q '$ref' $reg/$name:$tag > /dev/null" \
    "'$WORK/restart-registry.sh'")
  add_row "push $label" "$t_sk" "$t_rm"
done

{
  echo "## Pull and push (\`scripts/bench-pull.sh\`)"
  echo
  echo "Loopback registry (Debian's \`docker-registry\` 2.8), medians of $RUNS runs, seconds."
  echo "Pull: into an empty store (rmount also indexes every layer as it streams) vs"
  echo "\`skopeo copy docker://… oci:…\` into an empty layout. Push: into an empty registry,"
  echo "\`rmount push\` vs \`skopeo copy oci:… docker://…\`. Targets: pull ≤ 0.8× skopeo, push ≤ 1×."
  echo
  echo "| workload | skopeo | rmount | rmount / skopeo |"
  echo "| --- | --- | --- | --- |"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, kernel $(uname -r)."
} | write_section bench-pull
