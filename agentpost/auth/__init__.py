"""The one authentication core shared by HTTP, SMTP, IMAP and WebSocket."""
