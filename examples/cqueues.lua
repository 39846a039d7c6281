-- cqueues.lua: handler's jobs awaited from coroutines of a cqueues
-- controller. While three jobs run (one quick, one that never ends and is
-- stopped at its deadline, one that raises), the controller goes on serving
-- a coroutine that ticks every 100 ms; each waiting coroutine sleeps only
-- until its job ends. cq:loop() returns once all is done.
--
-- Run it from a checkout (Debian: apt-get install lua-cqueues):
--   LUA_PATH="$PWD/lua/?.lua;$PWD/lua/?/init.lua;;" LUA_CPATH="$PWD/build/?.so;;" \
--     luajit examples/cqueues.lua
local cqueues = require("cqueues")
local hc = require("handler.cqueues")

local t0 = cqueues.monotime()
local function log(fmt, ...)
  print(string.format("%6.3f s  " .. fmt, cqueues.monotime() - t0, ...))
end

local jobs = {
  { "a quick sum", function() local s = 0 for i = 1, 1e6 do s = s + i end return s end },
  { "an endless loop, max_ms = 350", function() while true do end end, { max_ms = 350 } },
  { "a raised error", function() error("something broke") end },
}

local cq = cqueues.new()
local left = #jobs

-- The loop's own work: a tick every 100 ms until the jobs are done.
cq:wrap(function()
  while left > 0 do
    cqueues.sleep(0.1)
    log("tick")
  end
end)

for _, j in ipairs(jobs) do
  cq:wrap(function()
    log("start  %s", j[1])
    local ok, res = hc.run(j[2], j[3])
    if ok then
      log("done   %s: %s", j[1], tostring(res))
    else
      log("failed %s: %s (%s)", j[1], res.type, res.message)
    end
    left = left - 1
  end)
end

assert(cq:loop())
log("cq:loop() returned: nothing left to do")
