-- luv.lua: handler's jobs awaited from coroutines of a luv loop. While
-- three jobs run (one quick, one that never ends and is stopped at its
-- deadline, one that raises), the loop goes on serving a 100 ms timer; each
-- coroutine sleeps only until its job ends. uv.run() returns once all is done.
--
-- Run it from a checkout (Debian: apt-get install lua-luv):
--   LUA_PATH="$PWD/lua/?.lua;$PWD/lua/?/init.lua;;" LUA_CPATH="$PWD/build/?.so;;" \
--     luajit examples/luv.lua
local uv = require("luv")
local hl = require("handler.luv")

local t0 = uv.hrtime()
local function log(fmt, ...)
  print(string.format("%6.3f s  " .. fmt, (uv.hrtime() - t0) / 1e9, ...))
end

-- The loop's own work: a tick every 100 ms until the jobs are done.
local ticks = uv.new_timer()
ticks:start(100, 100, function() log("tick") end)

local jobs = {
  { "a quick sum", function() local s = 0 for i = 1, 1e6 do s = s + i end return s end },
  { "an endless loop, max_ms = 350", function() while true do end end, { max_ms = 350 } },
  { "a raised error", function() error("something broke") end },
}

local left = #jobs
for _, j in ipairs(jobs) do
  coroutine.wrap(function()
    log("start  %s", j[1])
    local ok, res = hl.run(j[2], j[3])
    if ok then
      log("done   %s: %s", j[1], tostring(res))
    else
      log("failed %s: %s (%s)", j[1], res.type, res.message)
    end
    left = left - 1
    if left == 0 then ticks:close() end
  end)()
end

uv.run()
log("uv.run() returned: nothing left to do")
