# The schema is created on boot when missing, so a fresh checkout (or a test's
# temporary copy of the db) needs no `rails db:setup` step. `if_not_exists`
# makes concurrent first boots of several processes harmless.
Rails.application.config.after_initialize do
  require Rails.root.join("db", "schema").to_s
  ActiveRecord::Base.connection_pool.with_connection do |conn|
    ExampleSchema.load(conn) unless ExampleSchema.current?(conn)
  end
end
