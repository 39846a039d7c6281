-- copas.lua: handler's jobs awaited from coroutines of copas. While three
-- jobs run (one quick, one that never ends and is stopped at its deadline,
-- one that raises), copas goes on serving its sockets: here a UDP echo
-- server and a client that counts its round trips; each waiting coroutine
-- sleeps only until its job ends.
--
-- Run it from a checkout (Debian: apt-get install lua-copas):
--   LUA_PATH="$PWD/lua/?.lua;$PWD/lua/?/init.lua;;" LUA_CPATH="$PWD/build/?.so;;" \
--     luajit examples/copas.lua
local copas = require("copas")
local socket = require("socket")
local hc = require("handler.copas")

local t0 = socket.gettime()
local function log(fmt, ...)
  print(string.format("%6.3f s  " .. fmt, socket.gettime() - t0, ...))
end

local jobs = {
  { "a quick sum", function() local s = 0 for i = 1, 1e6 do s = s + i end return s end },
  { "an endless loop, max_ms = 350", function() while true do end end, { max_ms = 350 } },
  { "a raised error", function() error("something broke") end },
}
local left = #jobs

-- The loop's own work: a UDP echo server on the loopback, and a client that
-- pings it again and again until the jobs are done.
local function udp_socket()
  local s = assert(socket.udp())
  assert(s:setsockname("127.0.0.1", 0))
  s:settimeout(0)
  return s
end
local server, client = udp_socket(), udp_socket()
local server_ip, server_port = server:getsockname()
local echo_done = false
copas.addthread(function()
  while true do
    local data, ip, port = copas.receivefrom(server, 16)
    if data == "stop" then break end
    copas.sendto(server, data, ip, port)
  end
  server:close()
  echo_done = true
end)
local trips = 0
copas.addthread(function()
  while left > 0 do
    client:sendto("ping", server_ip, server_port)
    copas.receive(client, 16)
    trips = trips + 1
  end
  client:sendto("stop", server_ip, server_port)
  client:close()
end)

for _, j in ipairs(jobs) do
  copas.addthread(function()
    log("start  %s", j[1])
    local ok, res = hc.run(j[2], j[3])
    if ok then
      log("done   %s: %s (%d round trips so far)", j[1], tostring(res), trips)
    else
      log("failed %s: %s (%s) (%d round trips so far)", j[1], res.type, res.message, trips)
    end
    left = left - 1
  end)
end

-- copas.loop() never returns; step until the jobs and the echo are done.
while not echo_done do copas.step() end
log("all done after %d round trips", trips)
