#!/bin/sh
# A fast stand-in for `claude -p --output-format stream-json` used by the benchmarks. The first line of
# the prompt (stdin) may say "sleep=SECONDS" and/or "bytes=N" (N bytes of assistant events on stdout).
read -r first
cat > /dev/null
sleep_s=0; bytes=0
for kv in $first; do
  case "$kv" in
    sleep=*) sleep_s=${kv#sleep=} ;;
    bytes=*) bytes=${kv#bytes=} ;;
  esac
done
echo '{"type":"system","subtype":"init","session_id":"bench-session","model":"fake"}'
if [ "$bytes" -gt 0 ]; then
  line='{"type":"assistant","parent_tool_use_id":null,"message":{"content":[{"type":"text","text":"'$(head -c 8000 /dev/zero | tr '\0' 'x')'"}]}}'
  n=$((bytes / 8080 + 1))
  yes "$line" | head -n "$n"
fi
[ "$sleep_s" != 0 ] && sleep "$sleep_s"
echo '{"type":"result","subtype":"success","is_error":false,"result":"ok","session_id":"bench-session","total_cost_usd":0,"num_turns":1,"duration_ms":1}'
