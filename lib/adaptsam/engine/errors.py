"""Request errors the server reports as HTTP 4xx (everything else is a 500 and a bug)."""


class RequestError(ValueError):
    status_code = 400


class NotFound(RequestError):
    status_code = 404
