-- wrk -s post.lua: POST the body in $BODY with the headers in $HEADERS ("Name: value|Name: value").
wrk.method = "POST"
wrk.body = os.getenv("BODY") or '{"agent": "default", "message": "Hello", "context": {"event_id": "1"}}'
for h in string.gmatch(os.getenv("HEADERS") or "", "[^|]+") do
  local name, value = string.match(h, "^%s*([^:]+):%s*(.*)$")
  wrk.headers[name] = value
end
