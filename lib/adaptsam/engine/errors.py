"""Request errors the server reports as HTTP 4xx (everything else is a 500 and a bug)."""


class RequestError(ValueError):
    status_code = 400

    def __init__(self, message: str, status_code: int = 0):
        super().__init__(message)
        if status_code:
            self.status_code = status_code


class NotFound(RequestError):
    status_code = 404
