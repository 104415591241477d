# Sidekiq's own view of its process registry (the Web UI's Busy page), for tests/test_heartbeat.py.
#
#   REDIS_URL=redis://... ruby tests/sidekiq_processes.rb [quiet|stop]
#
# With an argument, first sends that signal to every process (`Sidekiq::Process#quiet!` /
# `#stop!`, as the Busy page's buttons do). Prints one line of JSON:
# {"processes": [every attribute of each Sidekiq::Process], "work": [[identity, tid, work], ...]}
require "json"
require "sidekiq/api"
# stdout is the JSON answer; Sidekiq 7 logs its Redis connection at INFO there.
Sidekiq.logger.level = Logger::WARN

# Sidekiq 6.x yields each running job as a hash; 7+ as a Sidekiq::Work, whose payload is the
# job's JSON string. Both become {"queue", "run_at", "payload" => the job hash}.
def work_entry(work)
  return work unless defined?(Sidekiq::Work) && work.is_a?(Sidekiq::Work)
  {"queue" => work.queue, "run_at" => work.raw("run_at"), "payload" => work.job.item}
end

# The running jobs first, then the processes: each beat writes a process's jobs and its busy
# count together, so a job seen here is counted in the busy count read after it (read the other
# way round, a beat between the two reads could show the job beside the last beat's count).
work = Sidekiq::WorkSet.new.map { |identity, tid, work| [identity, tid, work_entry(work)] }
processes = Sidekiq::ProcessSet.new.to_a
processes.each(&:quiet!) if ARGV[0] == "quiet"
processes.each(&:stop!) if ARGV[0] == "stop"
attributes = %w[identity hostname pid tag concurrency queues labels busy beat quiet rss rtt_us]
puts JSON.generate(
  "processes" => processes.map { |p| attributes.to_h { |name| [name, p[name]] }.merge("stopping" => p.stopping?) },
  "work" => work
)
