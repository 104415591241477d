# Records its arguments verbatim (JSON) so tests can check an exact round trip.
class HardJob
  include Sidekiq::Worker

  def perform(*args)
    JobRun.record!(job_class: "HardJob", jid: jid, args: args,
                   note: Current.user_id && "user_id=#{Current.user_id}")
  end
end
