-- wrk script: POST the same JSON body, read from a file, on every request.
--
--   wrk -t1 -c32 -d5s --latency -s loadtests/post.lua http://127.0.0.1:8080/v2/models/m/infer -- body.json
--
-- The request is formatted once per thread in init(); request() only hands it back.

local prepared

function init(args)
   local path = args[1]
   if path == nil then
      error("post.lua: give the body file after --, e.g. wrk ... -s post.lua URL -- body.json")
   end
   local file = assert(io.open(path, "rb"))
   local body = file:read("*a")
   file:close()
   prepared = wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end

function request()
   return prepared
end
