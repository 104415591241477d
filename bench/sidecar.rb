# Sidecar overhead benchmark: NoopJob over keep-alive HTTP (20 concurrent
# clients, real bin/gokiq-sidecar + Puma) vs the same job run in-process in a
# loop through the same Runner (reloader + middleware), in one run.
#   ruby bench/sidecar.rb [seconds=5] [clients=20]
require "net/http"
require "json"
require "socket"
require "tmpdir"

seconds = (ARGV[0] || 5).to_f
clients = (ARGV[1] || 20).to_i
root = File.expand_path("..", __dir__)
app_root = File.join(root, "rails_sidecar", "example_app")
tmp = Dir.mktmpdir("gokiq-bench")
ENV["GOKIQ_EXAMPLE_DB"] = File.join(tmp, "bench.sqlite3")
token = "bench-token"
port = TCPServer.open("127.0.0.1", 0) { |s| s.addr[1] }

pid = Process.spawn({"GOKIQ_SIDECAR_TOKEN" => token, "GOKIQ_LOG_LEVEL" => "warn"}, RbConfig.ruby,
                    File.join(root, "rails_sidecar", "bin", "gokiq-sidecar"), "--port", port.to_s,
                    "--threads", "#{clients}:#{clients}", "--rails-root", app_root, out: File::NULL, err: File::NULL)
begin
  deadline = Time.now + 60
  until (Net::HTTP.get_response("127.0.0.1", "/ready", port).code == "200" rescue false)
    raise "sidecar not ready" if Time.now > deadline
    sleep 0.1
  end

  body = JSON.generate("class" => "NoopJob", "args" => [1], "queue" => "default")
  headers = {"Authorization" => "Bearer #{token}", "Content-Type" => "application/json"}
  stop_at = Process.clock_gettime(Process::CLOCK_MONOTONIC) + seconds
  counts = Array.new(clients) do
    Thread.new do
      n = 0
      Net::HTTP.start("127.0.0.1", port) do |http|
        while Process.clock_gettime(Process::CLOCK_MONOTONIC) < stop_at
          res = http.post("/jobs/execute", body, headers)
          raise "HTTP #{res.code}: #{res.body}" unless res.code == "200"
          n += 1
        end
      end
      n
    end
  end.map(&:value)
  http_rate = counts.sum / seconds
ensure
  Process.kill("TERM", pid)
  Process.wait(pid)
end

$LOAD_PATH.unshift File.join(root, "rails_sidecar", "lib")
require "gokiq_sidecar"
require "gokiq_sidecar/boot"
GokiqSidecar::Boot.application(app_root)
runner = GokiqSidecar::Runner.new
job = JSON.parse(body)
klass = runner.resolve(job)
n = 0
stop_at = Process.clock_gettime(Process::CLOCK_MONOTONIC) + seconds
while Process.clock_gettime(Process::CLOCK_MONOTONIC) < stop_at
  runner.execute(klass, job, "default")
  n += 1
end
local_rate = n / seconds

puts format("http (%d keep-alive clients): %.0f jobs/s", clients, http_rate)
puts format("in-process loop:             %.0f jobs/s", local_rate)
puts format("ratio in-process/http:       %.1fx", local_rate / http_rate)
