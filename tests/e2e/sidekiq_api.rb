# Talks to Sidekiq's Redis through the example app's REAL Sidekiq client and Sidekiq's own Ruby
# API, so the e2e tests see exactly what a Rails app and Sidekiq's tools see.
#
#   ruby tests/e2e/sidekiq_api.rb '<json: one op or a list of ops>'     (or the JSON on stdin)
#
# Run with REDIS_URL (Sidekiq's Redis) and GOKIQ_EXAMPLE_DB (the app's sqlite file) set. The
# app root defaults to rails_sidecar/example_app (override with RAILS_ROOT). Rails boots once
# per call (~1-2 s), so batch operations: the argument may be a JSON list of operations; the
# answer is one line `GOKIQ_RESULT <json list of results>` on stdout, in the same order.
#
# Operations ({"op": name, ...}):
#   perform_async  class, args=[], set={}, user_id? -> jid  (Class.set(set).perform_async; user_id
#                  is set as Current.user_id, which the app persists into the job as `cattr`)
#   perform_in     class, args=[], in=seconds, set={} -> jid
#   push           item (hash; "class" may name an unknown class) -> jid  (Sidekiq::Client.push)
#                  middleware=false: a client without the app's client middleware
#                  class_object=true: "class" is turned into the class itself, so the class's
#                  sidekiq_options are merged in as `Klass.perform_async` merges them
#   push_bulk      class, args (list of arg lists), queue?, at? -> [jids]  (one LPUSH)
#   trickle        class, n, interval, args=[] -> [{jid, at}] (perform_async, sleep; n times)
#   perform_later  class, args=[], kwargs={}, set={} -> jid (ActiveJob; {"$person": name}
#                  in args becomes Person.create!(name:), passed as a GlobalID)
#   dead / retries / scheduled  jid?           -> [{jid, score, item, value}] (Sidekiq's sets)
#   retry_dead     jid? (else the first entry) -> jid        (DeadSet entry .retry)
#   retry_entry    jid, action ("retry", "delete" or "kill") -> jid (RetrySet entry, as the
#                  Web UI's Retry Now / Delete / Kill buttons act on it)
#   stats                                      -> Sidekiq::Stats numbers
#   job_runs       job_class?, jids?           -> [{job_class, jid, args, note, middleware, created_at}]
#   flaky_attempts key                         -> [created_at floats]
#   now                                        -> Time.now.to_f
#   sidekiq_version                            -> {loaded: the app's Sidekiq::VERSION,
#                                                  published: what the sidecar wrote in Redis}
#   sidekiq_cron_version                       -> the sidekiq-cron the app loaded, or nil
#   cron_job       name -> {status, last_enqueue_time (float), jid_history} or nil
#                  (sidekiq-cron's Ruby API: Sidekiq::Cron::Job.find)
#   cron_claims    pollers -> how many of `pollers` threads, each with its own unsaved
#                  sidekiq-cron job object (as each poller loads one), won the same tick
#                  (Job#should_enque?: the gem's ZADD on cron_job:<name>:enqueued)
#   web            method, path -> {status, location, body}: Sidekiq's Web UI with sidekiq-cron's
#                  tab, as a browser session would use it (a POST carries the page's CSRF token)
require "json"

root = ENV["RAILS_ROOT"] || File.expand_path("../../rails_sidecar/example_app", __dir__)
Dir.chdir(root)
require File.join(root, "config", "environment")
require "sidekiq/api"
Sidekiq.logger.level = Logger::WARN
# Only for the name of the key the sidecar publishes the version under (loads no app code).
$LOAD_PATH.unshift File.expand_path("../../rails_sidecar/lib", __dir__)
require "gokiq_sidecar"

module SidekiqApi
  module_function

  def klass(name)
    name.to_s.split("::").reduce(Object) { |mod, part| mod.const_get(part, false) }
  end

  def entry(e)
    {"jid" => e.jid, "score" => e.score, "item" => e.item, "value" => e.value}
  end

  def set_entries(set, jid)
    entries = set.to_a
    entries = entries.select { |e| e.jid == jid } if jid
    entries.map { |e| entry(e) }
  end

  def aj_arg(value)
    if value.is_a?(Hash) && value.key?("$person")
      Person.create!(name: value["$person"])
    else
      value
    end
  end

  def time_f(value)
    value&.to_f
  end

  def web_call(method, path, session, params = {})
    require "sidekiq/web"
    require "sidekiq/cron/web"
    env = Rack::MockRequest.env_for(path, method: method, params: params, "rack.session" => session)
    status, headers, body = Sidekiq::Web.new.call(env)
    text = +""
    body.each { |part| text << part }
    {"status" => status, "location" => headers["Location"], "body" => text}
  end

  def web(method, path)
    session = {}
    page = web_call("GET", "/cron", session)
    return page if method == "GET" && path == "/cron"
    token = page["body"][/name='authenticity_token' value='([^']+)'/, 1]
    web_call(method, path, session, method == "GET" ? {} : {"authenticity_token" => token})
  end

  def cron_claims(pollers)
    name = "gokiq_claim_probe_#{SecureRandom.hex(4)}"
    jobs = Array.new(pollers) { Sidekiq::Cron::Job.new(name: name, cron: "* * * * *", class: "NoopJob") }
    tick = Time.now.utc
    won = jobs.map { |job| Thread.new { job.should_enque?(tick) } }.map(&:value)
    jobs.first.destroy # never saved: this only removes its :enqueued set
    won.count(true)
  end

  def run(op)
    case op.fetch("op")
    when "perform_async"
      Current.user_id = op["user_id"] # persisted into the job's `cattr` by Sidekiq's middleware
      begin
        klass(op["class"]).set(op["set"] || {}).perform_async(*(op["args"] || []))
      ensure
        Current.reset
      end
    when "perform_in"
      klass(op["class"]).set(op["set"] || {}).perform_in(op.fetch("in"), *(op["args"] || []))
    when "push"
      client = Sidekiq::Client.new
      client.middleware(&:clear) if op["middleware"] == false
      item = op.fetch("item")
      item = item.merge("class" => klass(item["class"])) if op["class_object"]
      client.push(item)
    when "push_bulk"
      item = {"class" => klass(op["class"]), "args" => op.fetch("args")}
      item["queue"] = op["queue"] if op["queue"]
      item["at"] = op["at"] if op["at"]
      Sidekiq::Client.push_bulk(item)
    when "trickle"
      args = op["args"] || []
      Array.new(op.fetch("n")) do
        at = Time.now.to_f
        jid = klass(op["class"]).perform_async(*args)
        sleep op.fetch("interval")
        {"jid" => jid, "at" => at}
      end
    when "perform_later"
      args = (op["args"] || []).map { |a| aj_arg(a) }
      kwargs = (op["kwargs"] || {}).transform_keys(&:to_sym)
      job = klass(op["class"]).set((op["set"] || {}).transform_keys(&:to_sym))
      job = job.perform_later(*args, **kwargs)
      job.provider_job_id
    when "dead" then set_entries(Sidekiq::DeadSet.new, op["jid"])
    when "retries" then set_entries(Sidekiq::RetrySet.new, op["jid"])
    when "scheduled" then set_entries(Sidekiq::ScheduledSet.new, op["jid"])
    when "retry_dead"
      dead = Sidekiq::DeadSet.new
      e = op["jid"] ? dead.find_job(op["jid"]) : dead.first
      raise "no such dead job #{op["jid"].inspect}" unless e
      e.retry
      e.jid
    when "retry_entry"
      e = Sidekiq::RetrySet.new.find_job(op.fetch("jid"))
      raise "no such retry #{op["jid"].inspect}" unless e
      action = op.fetch("action")
      raise "bad action #{action.inspect}" unless %w[retry delete kill].include?(action)
      e.public_send(action)
      e.jid
    when "stats"
      s = Sidekiq::Stats.new
      {"processed" => s.processed, "failed" => s.failed, "enqueued" => s.enqueued,
       "scheduled_size" => s.scheduled_size, "retry_size" => s.retry_size,
       "dead_size" => s.dead_size, "queues" => s.queues}
    when "job_runs"
      rel = JobRun.order(:id)
      rel = rel.where(job_class: op["job_class"]) if op["job_class"]
      rel = rel.where(jid: op["jids"]) if op["jids"]
      rel.map do |r|
        {"job_class" => r.job_class, "jid" => r.jid, "args" => r.args, "note" => r.note,
         "middleware" => r.middleware, "created_at" => time_f(r.created_at)}
      end
    when "flaky_attempts"
      FlakyAttempt.where(key: op.fetch("key")).order(:id).map { |r| time_f(r.created_at) }
    when "now" then Time.now.to_f
    when "sidekiq_version"
      {"loaded" => Sidekiq::VERSION,
       "published" => Sidekiq.redis { |conn| conn.get(GokiqSidecar::SIDEKIQ_VERSION_KEY) }}
    when "sidekiq_cron_version"
      # sidekiq-cron.rb does not load its version file
      if defined?(Sidekiq::Cron::Job)
        require "sidekiq/cron/version"
        Sidekiq::Cron::VERSION
      end
    when "cron_job"
      job = Sidekiq::Cron::Job.find(op.fetch("name"))
      job && {"status" => job.status, "last_enqueue_time" => time_f(job.last_enqueue_time),
              "jid_history" => job.jid_history_from_redis}
    when "web" then web(op.fetch("method"), op.fetch("path"))
    when "cron_claims" then cron_claims(op.fetch("pollers"))
    else raise ArgumentError, "unknown op #{op["op"].inspect}"
    end
  end
end

input = ARGV[0] || $stdin.read
ops = JSON.parse(input)
single = ops.is_a?(Hash)
ops = [ops] if single
results = ops.map { |op| SidekiqApi.run(op) }
$stdout.puts "GOKIQ_RESULT " + JSON.generate(single ? results.first : results)
