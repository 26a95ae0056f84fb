"""Kling's error table: business code -> HTTP status and default message.

Every failure the simulator answers on the Kling API goes through `ApiError`, so the HTTP status and
the envelope `code` always agree with the table in docs/kling-contract.md.
"""

from __future__ import annotations

ERROR_TABLE: dict[int, tuple[int, str]] = {
    1000: (401, "Authentication failed"),
    1001: (401, "Authorization is empty"),
    1002: (401, "Authorization is invalid"),
    1003: (401, "Authorization is not yet valid"),
    1004: (401, "Authorization has expired"),
    1100: (429, "Account exception"),
    1101: (429, "Account in arrears (postpaid scenario)"),
    1102: (429, "Resource pack depleted or expired (prepaid scenario)"),
    1103: (403, "Unauthorized access to requested resource, such as API/model"),
    1200: (400, "Invalid request parameters"),
    1201: (400, "Invalid parameters, such as incorrect key or illegal value"),
    1202: (404, "The requested method is invalid"),
    1203: (404, "The requested resource does not exist, such as the model"),
    1300: (400, "Trigger strategy of the platform"),
    1301: (400, "Trigger the content security policy of the platform"),
    1302: (429, "The API request is too fast, exceeding the platform's rate limit"),
    1303: (429, "Concurrency or QPS exceeds the prepaid resource package limit"),
    1304: (429, "Trigger the platform's IP whitelisting policy"),
    5000: (500, "Server internal error"),
    5001: (503, "Server temporarily unavailable, usually due to maintenance"),
    5002: (504, "Server internal timeout, usually due to a backlog"),
}

SERVER_ERROR_CODES = (5000, 5001, 5002)


class ApiError(Exception):
    """A Kling error answer: `code` from ERROR_TABLE, a human message, the matching HTTP status."""

    def __init__(self, code: int, message: str | None = None) -> None:
        if code not in ERROR_TABLE:
            raise ValueError(f"unknown Kling error code {code}")
        self.code = code
        self.http_status, default = ERROR_TABLE[code]
        self.message = message or default
        super().__init__(f"{code}: {self.message}")
