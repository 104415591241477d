# Sidekiq's own view of its process registry (the Web UI's Busy page), for tests/test_heartbeat.py.
#
#   REDIS_URL=redis://... ruby tests/sidekiq_processes.rb [quiet|stop]
#
# With an argument, first sends that signal to every process (`Sidekiq::Process#quiet!` /
# `#stop!`, as the Busy page's buttons do). Prints one line of JSON:
# {"processes": [every attribute of each Sidekiq::Process], "work": [[identity, tid, work], ...]}
require "json"
require "sidekiq/api"

processes = Sidekiq::ProcessSet.new.to_a
processes.each(&:quiet!) if ARGV[0] == "quiet"
processes.each(&:stop!) if ARGV[0] == "stop"
attributes = %w[identity hostname pid tag concurrency queues labels busy beat quiet rss rtt_us]
puts JSON.generate(
  "processes" => processes.map { |p| attributes.to_h { |name| [name, p[name]] }.merge("stopping" => p.stopping?) },
  "work" => Sidekiq::WorkSet.new.map { |identity, tid, work| [identity, tid, work] }
)
