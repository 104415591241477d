# Several processes share one sqlite file (the sidecar's many Puma threads and
# scripts that enqueue with `ruby -e`). WAL lets readers and one writer work at
# the same time; the busy handler waits for the write lock by sleeping in Ruby,
# which releases the VM lock (the C-level `timeout:` would not).
module SqliteSleepingBusyHandler
  def configure_connection
    super
    @connection.busy_handler do |count|
      sleep 0.01
      count < 1000
    end
    @connection.execute("PRAGMA journal_mode=WAL")
    @connection.execute("PRAGMA synchronous=NORMAL")
  end
end

ActiveSupport.on_load(:active_record) do
  require "active_record/connection_adapters/sqlite3_adapter"
  ActiveRecord::ConnectionAdapters::SQLite3Adapter.prepend(SqliteSleepingBusyHandler)
end
