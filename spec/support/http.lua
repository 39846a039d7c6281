-- spec/support/http.lua: a small HTTP client for the specs, on lua-luv: one
-- request (get), and many at once over C connections in flight (load), each
-- timed with uv.hrtime. Requests are HTTP/1.0 (the server closes the
-- connection after the response, and nginx never chunks a 1.0 response);
-- the body is what comes before the close, checked against Content-Length
-- when there is one, and a chunked body is decoded all the same.
--
-- Every outcome is a table: { path =, status =, headers =, body =,
-- latency_us = } or, when the request failed, { path =, err =, latency_us = }
-- (connection refused, reset, a malformed or cut response, the timeout).
-- Nothing here raises from inside a luv callback: luv ends the whole process
-- on an error there.
local uv = require("luv")

local concat, sort, format = table.concat, table.sort, string.format
local tonumber, tostring, pcall, ipairs, type = tonumber, tostring, pcall, ipairs, type
local ceil, max, min = math.ceil, math.max, math.min

local M = {}

--- host, port, path of `url_or_port` (a port number, or
-- "http://127.0.0.1:8080/path") and `path` (which wins when given). The host
-- must be an IP address: nothing is resolved.
local function target(url_or_port, path)
  if type(url_or_port) == "number" then return "127.0.0.1", url_or_port, path or "/" end
  local host, port, rest = tostring(url_or_port):match("^http://([^:/]+):?(%d*)(.*)$")
  if host == nil then error("http: not a port or an http:// URL: " .. tostring(url_or_port), 3) end
  return host, tonumber(port) or 80, path or (rest ~= "" and rest or "/")
end

--- A chunked body decoded, or nil and why.
local function dechunk(s)
  local out, pos = {}, 1
  while true do
    local size_hex, after = s:match("^(%x+)[^\r\n]*\r\n()", pos)
    if size_hex == nil then return nil, "malformed chunk size" end
    local size = tonumber(size_hex, 16)
    if size == 0 then return concat(out) end
    if #s < after + size + 1 then return nil, "body cut short in a chunk" end
    out[#out + 1] = s:sub(after, after + size - 1)
    pos = after + size + 2
  end
end

--- status, headers (lower-case names; a repeated header's values joined with
-- ", "), body of a whole response; or nil and why.
local function parse(raw)
  local head_end = raw:find("\r\n\r\n", 1, true)
  if head_end == nil then
    return nil, format("no complete response head in %d bytes", #raw)
  end
  local head, body = raw:sub(1, head_end - 1), raw:sub(head_end + 4)
  local status = tonumber(head:match("^HTTP/%d%.%d (%d%d%d)"))
  if status == nil then return nil, "malformed status line: " .. head:match("^[^\r\n]*") end
  local headers = {}
  for name, value in head:gmatch("\r\n([^:\r\n]+):[ \t]*([^\r\n]*)") do
    name = name:lower()
    headers[name] = headers[name] and headers[name] .. ", " .. value or value
  end
  if (headers["transfer-encoding"] or ""):lower():find("chunked", 1, true) then
    local decoded, why = dechunk(body)
    if decoded == nil then return nil, why end
    body = decoded
  elseif headers["content-length"] then
    local want = tonumber(headers["content-length"])
    if want ~= #body then
      return nil, format("body of %d bytes, Content-Length says %s", #body, headers["content-length"])
    end
  end
  return status, headers, body
end

--- Starts one request on luv's loop; `done(outcome)` is called exactly once
-- (see the top of this file). Returns a function that abandons the request
-- with `why` as its error (nothing happens if it has ended already).
local function fetch(host, port, path, done)
  local started = uv.hrtime()
  local outcome = { path = path }
  local chunks, finished = {}, false
  local tcp = uv.new_tcp()
  local function finish(err)
    if finished then return end
    finished = true
    outcome.latency_us = (uv.hrtime() - started) / 1000
    if err then outcome.err = err end
    if tcp and not tcp:is_closing() then tcp:close() end
    done(outcome)
  end
  if tcp == nil then
    finish("cannot make a socket")
    return finish
  end
  local function on_read(err, data)
    if finished then return end
    if err then return finish("read: " .. tostring(err)) end
    if data then
      chunks[#chunks + 1] = data
      return
    end
    local ok, status, headers, body = pcall(parse, concat(chunks))
    if not ok then return finish("parse: " .. tostring(status)) end
    if status == nil then return finish(headers) end
    outcome.status, outcome.headers, outcome.body = status, headers, body
    finish(nil)
  end
  local request = format("GET %s HTTP/1.0\r\nHost: %s:%d\r\nConnection: close\r\n\r\n", path, host, port)
  local function on_connect(cerr)
    if finished then return end
    if cerr then return finish("connect: " .. tostring(cerr)) end
    local req, werr = tcp:write(request, function(err)
      if err and not finished then finish("write: " .. tostring(err)) end
    end)
    if req == nil then return finish("write: " .. tostring(werr)) end
    local reading, rerr = tcp:read_start(function(err, data)
      local fine, why = pcall(on_read, err, data)
      if not fine then finish("client: " .. tostring(why)) end
    end)
    if reading == nil then finish("read: " .. tostring(rerr)) end
  end
  local ok, req, cerr = pcall(tcp.connect, tcp, host, port, function(err)
    local fine, why = pcall(on_connect, err)
    if not fine then finish("client: " .. tostring(why)) end
  end)
  if not ok then
    finish("connect: " .. tostring(req))
  elseif req == nil then
    finish("connect: " .. tostring(cerr))
  end
  return finish
end

--- Runs luv's loop until `is_done()` or `timeout_ms` pass; then `on_timeout()`
-- (which must end what is in flight), and the loop once more so closed
-- handles are released.
local function drive(is_done, timeout_ms, on_timeout)
  local timed_out = false
  local timer = uv.new_timer()
  timer:start(timeout_ms, 0, function() timed_out = true end)
  while not is_done() and not timed_out do uv.run("once") end
  if not is_done() then on_timeout() end
  timer:stop()
  timer:close()
  -- Close callbacks run on the next turns; "nowait" never blocks.
  for _ = 1, 3 do uv.run("nowait") end
end

--- One GET. `url_or_port`: a port on 127.0.0.1, or an http:// URL; `path`
-- defaults to the URL's. `timeout_ms` defaults to 5000. Returns status, body,
-- headers; or nil, why.
function M.get(url_or_port, path, timeout_ms)
  local host, port, p = target(url_or_port, path)
  local result
  local abandon = fetch(host, port, p, function(o) result = o end)
  drive(function() return result ~= nil end, timeout_ms or 5000,
    function() abandon(format("timeout after %d ms", timeout_ms or 5000)) end)
  if result.err then return nil, result.err end
  return result.status, result.body, result.headers
end

--- Many GETs, `concurrency` of them in flight at a time (default 10), all in
-- one luv loop:
--   load{ port = 8080, requests = { { path = "/a", count = 40 }, { path = "/b", count = 10 } },
--         concurrency = 10, timeout_ms = 10000 }
-- The requests go out interleaved (a, b, a, b, ..., then the rest of a).
-- Returns, once all have ended or timeout_ms (default 30000) passed:
--   { results = { outcome, ... } in the order they were sent (see the top),
--     ok = count with a status, failed = { outcome, ... } the others,
--     latencies = { µs, ... } of those with a status, elapsed_us = the whole run }
-- Requests still in flight at the timeout fail with err "timeout", those
-- not sent yet with "not sent (timeout)".
function M.load(opts)
  local host, port = target(opts.url or opts.port, "/")
  local queue, left = {}, {}
  for i, r in ipairs(opts.requests) do left[i] = r.count or 1 end
  repeat
    local added = false
    for i, r in ipairs(opts.requests) do
      if left[i] > 0 then
        queue[#queue + 1] = r.path
        left[i] = left[i] - 1
        added = true
      end
    end
  until not added
  local total, concurrency = #queue, max(1, opts.concurrency or 10)
  local timeout_ms = opts.timeout_ms or 30000
  local results, aborts, next_i, ended = {}, {}, 1, 0
  local started = uv.hrtime()

  local function start_next()
    if next_i > total then return end
    local i = next_i
    next_i = next_i + 1
    aborts[i] = fetch(host, port, queue[i], function(o)
      results[i] = o
      aborts[i] = nil
      ended = ended + 1
      start_next()
    end)
  end

  for _ = 1, min(concurrency, total) do start_next() end
  drive(function() return ended == total end, timeout_ms, function()
    next_i = total + 1 -- nothing more goes out
    for i = 1, total do
      if aborts[i] then aborts[i]("timeout") end
    end
    for i = 1, total do
      results[i] = results[i] or { path = queue[i], err = "not sent (timeout)" }
    end
  end)

  local out = { results = results, ok = 0, failed = {}, latencies = {},
    elapsed_us = (uv.hrtime() - started) / 1000 }
  for i = 1, total do
    local o = results[i]
    if o.status then
      out.ok = out.ok + 1
      out.latencies[#out.latencies + 1] = o.latency_us
    else
      out.failed[#out.failed + 1] = o
    end
  end
  return out
end

--- The p-th percentile (0 < p <= 100) of a list of numbers, by nearest rank:
-- percentile(l, 50) is the median, percentile(l, 100) the largest. nil for
-- an empty list. The list is not changed.
function M.percentile(list, p)
  local n = #list
  if n == 0 then return nil end
  local sorted = {}
  for i = 1, n do sorted[i] = list[i] end
  sort(sorted)
  return sorted[min(n, max(1, ceil(p / 100 * n)))]
end

--- "path: why" of each failed outcome, for messages (at most `limit`, 10).
function M.describe_failures(failed, limit)
  local lines = {}
  for i = 1, min(#failed, limit or 10) do
    lines[i] = tostring(failed[i].path) .. ": " .. tostring(failed[i].err)
  end
  if #failed > #lines then lines[#lines + 1] = format("... and %d more", #failed - #lines) end
  return concat(lines, "\n")
end

return M
