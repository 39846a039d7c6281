-- quickstart.lua: handler in one screen. Each call below runs a Lua closure
-- in a worker process and comes back like pcall: true and the results, or
-- false and an error value. Whatever the closure does, this host carries on.
--
-- Run it from a checkout with tools/demo, or by hand:
--   LUA_PATH="$PWD/lua/?.lua;$PWD/lua/?/init.lua;;" LUA_CPATH="$PWD/build/?.so;;" \
--     luajit examples/quickstart.lua
local handler = require("handler")

-- Prints what a call returned: its results, or the fields of its error value.
local function show(title, ok, ...)
  io.write(string.format("%-34s", title))
  if ok then
    local parts = {}
    for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
    print("ok     " .. table.concat(parts, ", "))
    return
  end
  local err = ...
  print("failed " .. err.type)
  print(string.format("%34s   message: %s", "", err.message))
  if err.reason ~= nil then
    print(string.format("%34s   reason:  %s", "", tostring(err.reason)))
  end
end

print("handler quickstart: five closures, five outcomes, one host\n")

-- 1. A normal result. Upvalues travel with the closure.
local base = 40
show("1. a result", handler.run(function() return base + 2, "and more" end))

-- 2. A closure that never returns is killed at its time limit.
show("2. an endless loop, max_ms = 100",
  handler.run(function() while true do end end, { max_ms = 100 }))

-- 3. A closure that grows without bound hits its heap limit; catching the
-- allocation failure with pcall does not help it.
show("3. a runaway table, 1 MiB heap", handler.run(function()
  local t = {}
  while true do
    pcall(function() t[#t + 1] = string.rep("x", 1024) .. #t end)
  end
end, { max_heap_bytes = 2 ^ 20 }))

-- 4. A raised error comes back as the reason, with the worker's traceback.
show("4. a raised error", handler.run(function() error("something broke") end))

-- 5. Memory corruption through the FFI takes down the worker, not the host.
show("5. a segfault through the FFI", handler.run(function()
  local ffi = require("ffi")
  ffi.cast("int *", 0)[0] = 1
end))

-- The host is untouched, and the next call gets a fresh worker.
print()
show("6. and again, afterwards", handler.run(function() return "still here" end))
print("\nThe host is still alive: every failure above was a value, not a crash.")
