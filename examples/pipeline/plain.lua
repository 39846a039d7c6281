-- plain.lua: the same transform in one plain LuaJIT process, no isolation:
-- the reference rate for bench/ (poisoned records would stop it, so it
-- skips them).
--   luajit examples/pipeline/plain.lua examples/pipeline/transform.lua < records.jsonl > out.jsonl
local cjson = require("cjson")
local t = dofile(arg[1])
t.init()
local out, n = {}, 0
for line in io.lines() do
  local r = cjson.decode(line)
  if r.poison == nil then
    out[#out + 1] = cjson.encode(t.map(r))
    n = n + 1
    if #out == 1000 then
      io.write(table.concat(out, "\n"), "\n")
      out = {}
    end
  end
end
if #out > 0 then io.write(table.concat(out, "\n"), "\n") end
io.stderr:write(n, " records\n")
