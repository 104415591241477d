class SleepJob
  include Sidekiq::Worker

  def perform(ms)
    sleep(ms.to_f / 1000)
  end
end
