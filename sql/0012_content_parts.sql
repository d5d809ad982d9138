-- Content parts (issue 15 item 6): a user message of POST /api/chat may be a list of OpenAI-style
-- parts (text, image_url). `parts` keeps them exactly as sent and is what the upstream gets in the
-- thread's history; `content` keeps the text parts joined, so titles, search and every reader of
-- plain text go on working. NULL for a plain-text message (every message before this one).
ALTER TABLE messages ADD COLUMN parts jsonb;
